"""What the Triton code generator expresses (the ``TRITON`` generator the planning passes consult) and the
lowering passes that turn a plan into the text of one generated module:

    select_kernels   the orderings the module holds (recorded by the capabilities pass) and its template
    fill_slots       the header, the module record, the linear and / or quadratic slots
    render_text      the template rendered (attngen.codegen.render)

A module holding the linear and the quadratic kernels dispatches on the key length at a ``crossover``
argument (the plan's crossover for the caller's head dim; the record holds the default at head dim 64).
The output is deterministic: the same spec gives the same bytes.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, replace

import sympy

from attngen.codegen.features import params as param_slots
from attngen.codegen.features import vec_slots
from attngen.codegen.linear import check_linear, linear_slots
from attngen.codegen.quadratic import describe, tile_slots
from attngen.codegen.render import render, template_hash
from attngen.errors import PlanError
from attngen.ir import Generator, Ordering, Plan, Step
from attngen.version import __version__

TEMPLATES = {Ordering.LINEAR: "linear.py.j2", Ordering.QUADRATIC: "quadratic.py.j2"}  # by the module's first ordering


def check_kernel(plan, ordering: Ordering) -> None:
    """PlanError (saying why) unless the templates express ``ordering`` for ``plan`` (a Plan or a Draft)."""
    if ordering is Ordering.LINEAR:
        check_linear(plan)
        return
    slots = tile_slots(plan)
    if plan.choice is not None and plan.choice.below is Ordering.TOPK_SPARSE:
        spec = plan.spec
        if not slots["flash"]:
            raise PlanError(f"{spec.where} ({spec.name}, {spec.mode}): block-sparse kernels are generated for the "
                            "softmax family only (an exp similarity with a row-sum normaliser)")
        if spec.approximation.block > slots["sparse_max_block"]:
            raise PlanError(f"{spec.where}: approx.block = {spec.approximation.block}: the Triton block-sparse "
                            f"kernels take blocks of 16 .. {slots['sparse_max_block']}; use a smaller block, or "
                            "backend='torch'")


TRITON = Generator("triton", (Ordering.LINEAR, Ordering.QUADRATIC),
                   frozenset({Ordering.LINEAR, Ordering.QUADRATIC, Ordering.TOPK_SPARSE}), check_kernel)


def module_name(plan: Plan) -> str:
    return f"{plan.spec.name}_{plan.spec.mode}"


def module_tag(orderings) -> str:
    """l, q or lq: modules of one spec with other kernels have other names and op names."""
    return "".join(o.value[0] for o in orderings)


@dataclass(frozen=True)
class Module:
    """The lowering's draft: a plan on its way to the text of its generated module."""
    plan: Plan
    orderings: tuple = ()
    template: str | None = None
    slots: dict | None = None
    text: str | None = None
    steps: tuple = ()

    def step(self, name: str, detail: str, **changes) -> "Module":
        return replace(self, steps=self.steps + (Step(name, detail),), **changes)


def select_kernels(m: Module) -> Module:
    cap = m.plan.capabilities
    if not cap.kernels:
        raise PlanError(cap.kernels_reason or f"{m.plan.spec.where}: no Triton kernels for this plan")
    template = TEMPLATES[cap.kernels[0]]
    return m.step("select-kernels", f"{', '.join(o.value for o in cap.kernels)} -> {template}",
                  orderings=cap.kernels, template=template)


def fill_slots(m: Module) -> Module:
    plan, orderings = m.plan, m.orderings
    spec = plan.spec
    vec = vec_slots(plan)  # fused matmul feature maps: the kernels compute the prologue's q', k' themselves
    tag = module_tag(orderings) + ("v" if vec else "")
    written = plan.prologue.spec if plan.prologue is not None else spec  # the spec as written (not a prologue's core)
    out = {
        "version": __version__, "spec_name": spec.name, "mode": spec.mode, "spec_hash": spec.hash,
        "max_length": _max_length_code(spec.length_limit),
        "template_hash": template_hash(), "spec_yaml": written.to_yaml().rstrip("\n").splitlines(),
        "prefix": f"_{spec.name}", "fn": f"{spec.name}_attention", "causal": spec.causal,
        "op_name": f"{spec.name}_{spec.mode}_{tag}_{spec.hash[:8]}_{template_hash()[:8]}",
        "params": param_slots(written if vec else spec),  # fused feature maps: every parameter the spec has
        "vec": vec,
        "regenerate": 'attngen build (attngen.pipeline.lower(attngen.pipeline.plan(spec, target="triton")))',
        "linear": Ordering.LINEAR in orderings, "quadratic": Ordering.QUADRATIC in orderings,
        "gate": spec.gate.name if spec.gate is not None else None,  # a gate's keyword
        "gate_dim": spec.gate is not None and spec.gate.per == "key_dim",
        "theta": spec.rotary.theta if spec.rotary is not None else None,  # rotary positions
        "rotary": spec.rotary is not None,
        # a feature prologue (attngen.passes.prologue): the op computes q', k' before these kernels
        "prologue_lines": textwrap.wrap(plan.prologue.describe(), 110) if plan.prologue is not None and not vec
        else [],
        # parameters and row reductions the kernels evaluate inside their feature maps (no prologue)
        "fused_lines": textwrap.wrap(plan.prologue.describe() if vec else plan.fused, 110),
        "fp32_features": bool(plan.fused or vec),  # those feature maps keep fp32 dot operands (kernel_macros.j2)
    }
    if Ordering.LINEAR in orderings:
        out.update(linear_slots(plan))
    if Ordering.QUADRATIC in orderings:
        q = tile_slots(plan)
        out.update(q, quadratic_lines=describe(plan, q))
        if Ordering.LINEAR in orderings:
            out["crossover"] = _length_code(plan.capabilities.crossover)
    return m.step("fill-slots", f"{len(out)} slots", slots=out)


def render_text(m: Module) -> Module:
    text = render(m.template, m.slots)
    return m.step("render", f"{m.template}: {text.count(chr(10))} lines", text=text)


def _length_code(n: float) -> str:
    return 'float("inf")' if n == float("inf") else repr(float(n))


def _max_length_code(limit):
    """The spec's max_length for the module record: an int, None, or (length-dependent) a lambda of n_q, n_k
    printed from the validated expression (+ - * /, integer powers, max, min: docs/specs.md)."""
    if limit is None or isinstance(limit, int):
        return limit
    return "lambda n_q, n_k: " + sympy.pycode(limit, fully_qualified_modules=False)
