"""Run the command line interface as ``python -m gateway``."""

from gateway.cli import main

main()
