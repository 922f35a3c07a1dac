"""The compiler on one screen: three named pass lists and the two entry points.

    spec = attngen.load_spec("cosformer")          # the frontend: YAML -> validated Spec (restricted parser)
    plan = pipeline.plan(spec, target="triton")    # FRONTEND + PLANNING passes: Spec -> Plan
    text = pipeline.lower(plan)                    # LOWERING passes: Plan -> the generated module's source

Each pass takes the draft IR and returns a new one (attngen.passes.draft.Draft, attngen.codegen.module.Module),
adding a line to the trace that ``attngen plan --trace`` prints. Nothing else calls the renderer.
"""
from __future__ import annotations

from dataclasses import replace

from attngen.codegen.module import TRITON, Module, fill_slots, render_text, select_kernels
from attngen.errors import PlanError
from attngen.frontend.spec import Spec, load_spec
from attngen.ir import DEFAULT_CHUNK, Plan
from attngen.passes import prologue
from attngen.passes.capabilities import capabilities
from attngen.passes.draft import Draft
from attngen.passes.frontend import check_names, read_spec, softmax_as_exp, substitute_constants
from attngen.passes.planning import (
    approximate,
    choose_ordering,
    classify,
    costs,
    delegate,
    linear_terms,
    ordering,
    separate,
    token_inputs,
    window,
)

FRONTEND = (check_names, read_spec, substitute_constants, softmax_as_exp)
PLANNING = (separate, classify, linear_terms, approximate, costs, window, token_inputs, choose_ordering, delegate,
            capabilities)
LOWERING = (select_kernels, fill_slots, render_text)

GENERATORS = {TRITON.name: TRITON}
TARGETS = ("torch", *GENERATORS)


def plan(spec, *, target: str = "torch", head_dim: int = 64, chunk: int = DEFAULT_CHUNK, force=None) -> Plan:
    """Plan ``spec`` (a Spec, or anything load_spec takes) for ``target``: "torch" chooses among every ordering,
    "triton" among those its kernels run (PlanError when its templates cannot express the choice). ``force``
    names an ordering ("linear", "quadratic", ...) instead of the cost model's choice."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    if target not in TARGETS:
        raise PlanError(f"target={target!r}: expected one of {', '.join(map(repr, TARGETS))}")
    if spec.terms:
        raise PlanError(f"{spec.where}: {spec.name} has {len(spec.terms)} terms, each planned on its own: "
                        "pipeline.plan(term.spec) for term in spec.terms (attngen.compile combines them)")
    generator = GENERATORS.get(target)
    pro = prologue.split(spec) if generator is not None else None
    if pro is not None:  # the kernels run the core spec on feature rows the prologue computes (or the kernels do)
        core, pro = _prologue_plan(pro, target, head_dim, chunk, force)
        return replace(core, prologue=pro, trace=(("planning", "prologue", pro.describe()),) + core.trace)
    x = Draft(spec, head_dim, chunk, ordering(force, spec) if force is not None else None, target=target,
              available=generator.choosable if generator else None, generator=TRITON, subplan=_subplan)
    rows = []
    for stage, passes in (("frontend", FRONTEND), ("planning", PLANNING)):
        for p in passes:
            n = len(x.steps)
            x = p(x)
            rows += [(stage, p.__name__, f"{s.name}: {s.detail}") for s in x.steps[n:]] or [
                (stage, p.__name__, "(nothing to do)")]
    return Plan(spec=spec, similarity=x.similarity, reweight=x.reweight, normalize=x.normalize,
                linear_terms=x.linear_terms, candidates=x.candidates, choice=x.choice, derivation=x.steps,
                head_dim=head_dim, chunk=chunk, capabilities=x.capabilities, estimator=x.estimator, target=target,
                sdpa=x.sdpa, fused=prologue.fused(spec) if generator is not None else "",
                trace=tuple(rows))


def lower(plan: Plan) -> str:
    """The source text of ``plan``'s generated Triton module (PlanError when it has no kernels)."""
    return lowering(plan).text


def lowering(plan: Plan) -> Module:
    """The lowering's result with its trace (Module.steps)."""
    m = Module(plan)
    for p in LOWERING:
        m = p(m)
    return m


def trace(plan: Plan) -> list:
    """(stage, pass, detail) of every pass that ran: the frontend and planning ones, then the lowering's
    (or why there is none)."""
    rows = list(plan.trace)
    try:
        m = Module(plan)
        for p in LOWERING:
            n = len(m.steps)
            m = p(m)
            rows += [("lowering", p.__name__, s.detail) for s in m.steps[n:]]
    except PlanError as exc:
        rows.append(("lowering", "select_kernels", f"no Triton module: {exc}"))
    return rows


def _prologue_plan(pro, target: str, head_dim: int, chunk: int, force) -> tuple:
    """The core spec's plan and the prologue, fused into the linear kernels where prologue.fusable says the
    feature maps can be and the core plan runs the linear kernels alone (its ordering at every length), else
    computed before the kernels (with the reason in Prologue.unfused)."""
    width = pro.width(head_dim)
    why = prologue.fusable(pro)
    forced = getattr(force, "value", force)
    if not why and forced not in (None, "linear"):
        why = f"plan {forced!r} forced: the fused feature maps run in the linear kernels only"
    if not why:
        core = plan(pro.core, target=target, head_dim=width, chunk=chunk, force="linear")
        why = fused_linear(core)
        if not why:
            return core, replace(pro, fused=True)
    return plan(pro.core, target=target, head_dim=width, chunk=chunk, force=force), replace(pro, unfused=why)


def fused_linear(core: Plan) -> str:
    """'' when the core plan's linear kernels take fused matmul feature maps, else why not."""
    if tuple(o.value for o in core.capabilities.kernels) != ("linear",):
        return core.capabilities.kernels_reason or "the core plan has no linear Triton kernels"
    if core.reweight.decay is not None:
        return "a decay reweighting (its kernels do not fuse matmul feature maps)"
    if any(t.feature.power > 1 for t in core.linear_terms):
        return "tensor-power features of the core"
    return ""


def _subplan(spec: Spec, *, head_dim: int, chunk: int, force) -> Plan:
    """An inner plan (a topk_sparse estimator) through the same passes."""
    return plan(spec, head_dim=head_dim, chunk=chunk, force=force)
