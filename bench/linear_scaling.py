"""Causal linear plan (torch backend) vs the naive reference vs PyTorch SDPA on this CPU.

Same as `python -m benchmarks linear`: python bench/linear_scaling.py [--max-len N] [--spec NAME] [--out DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, which holds benchmarks/

from benchmarks.cli import PROG, main  # noqa: E402

if __name__ == "__main__":
    main(["linear", *sys.argv[1:]], prog_name=PROG)
