"""`python -m tunery ...` (and `torchrun -m tunery ...`) run the CLI."""

from tunery.cli import entry

entry()
