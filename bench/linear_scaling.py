"""Causal linear plan (torch backend) vs the naive reference vs PyTorch SDPA on this CPU.

Same as `attngen bench`; run from the repository root: python bench/linear_scaling.py [--max-len N]
"""
import sys

from attngen.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
