"""`python -m trmlx` is the `trmlx` command."""

from trmlx.cli import main

main()
