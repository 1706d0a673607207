"""``python -m batchsr``: the same command line as the ``batchsr`` script."""

from batchsr.cli import main

if __name__ == "__main__":
    main(prog_name="batchsr")
