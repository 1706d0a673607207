"""``python -m batchsr``: the same command line as the ``batchsr`` script."""

from batchsr.cli import main

main(prog_name="batchsr")
