"""SEA-style top-k block-sparse attention (docs/sparse.md): block scores and the selection (selection), the
torch gather execution (execute), and ``attend`` / ``run_triton`` over a selection on either backend (attend)."""
from attngen.approx.topk_sparse.attend import attend, run_triton
from attngen.approx.topk_sparse.selection import (
                                                  Selection,
                                                  allowed_blocks,
                                                  always_blocks,
                                                  block_scores,
                                                  pool,
                                                  select,
                                                  select_blocks,
                                                  selection_from_blocks,
)

__all__ = ["Selection", "allowed_blocks", "always_blocks", "attend", "block_scores", "pool", "run_triton", "select",
           "select_blocks", "selection_from_blocks"]
