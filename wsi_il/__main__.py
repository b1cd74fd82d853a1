"""Run the command line with `python -m wsi_il`."""

from wsi_il.cli import main

main()
