"""`python -m portcullis` runs the CLI."""

from portcullis.cli import main

main()
