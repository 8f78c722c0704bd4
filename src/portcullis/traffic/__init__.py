"""Traffic control: rate limits (algorithms apart from storage)."""
