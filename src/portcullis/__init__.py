"""Portcullis: a self-hosted API security gateway for SaaS platforms."""

__version__ = "0.1.0"
