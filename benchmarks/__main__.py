"""``python -m benchmarks <benchmark> [options]``: see benchmarks/cli.py."""
from benchmarks.cli import PROG, main

if __name__ == "__main__":
    main(prog_name=PROG)
