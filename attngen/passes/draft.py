"""The IR while the passes run: a Draft, which each pass returns anew with more of its fields filled."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from attngen.frontend.spec import Normalize, Spec
from attngen.ir import Capabilities, Choice, Generator, Ordering, Step


@dataclass(frozen=True)
class Draft:
    """The IR while the passes run; each pass returns a new Draft with its fields filled."""
    spec: Spec
    head_dim: int
    chunk: int
    force: Ordering | None
    target: str = "torch"  # the backend the plan is for: "torch" (every ordering) or a generator's name
    available: frozenset | None = None  # orderings the target implements (None: all)
    generator: Generator | None = field(default=None, compare=False)  # what the code generator expresses
    subplan: object = field(default=None, compare=False, repr=False)  # plans a spec with the same passes
    steps: tuple = ()
    similarity_expr: object = None
    reweight_expr: object = None
    normalize: Normalize | None = None
    similarity: object = None
    reweight: object = None
    linear_terms: tuple = ()
    candidates: tuple = ()
    choice: Choice | None = None
    estimator: object = None  # topk_sparse: the estimator's Plan
    capabilities: Capabilities | None = None
    sdpa: object = None  # attngen.ir.Sdpa when the torch target's quadratic ordering is SDPA's operator

    def step(self, name: str, detail: str, **changes) -> "Draft":
        return replace(self, steps=self.steps + (Step(name, detail),), **changes)


def with_steps(x: Draft, steps: list) -> Draft:
    for name, detail in steps:
        x = x.step(name, detail)
    return x


