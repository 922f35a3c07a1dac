"""Human-readable views of a Plan: the derivation, the cost table, the choice, and the op graph as DOT."""
from __future__ import annotations

import networkx as nx
import sympy

from . import cost
from .ir import Plan


def cost_table(plan: Plan, n: int, head_dim: int | None = None) -> list:
    """Rows (ordering, legal, flops, bytes, cost, reason) at length n."""
    d = head_dim or plan.head_dim
    rows = []
    for c in plan.candidates:
        if c.legal:
            f, b, total = cost.evaluate(c, n, d, plan.chunk)
            rows.append((c.ordering.value, True, f, b, total, c.reason))
        else:
            rows.append((c.ordering.value, False, None, None, None, c.reason))
    return rows


def explain(plan: Plan, n: int = 4096, head_dim: int | None = None) -> str:
    d = head_dim or plan.head_dim
    spec = plan.spec
    lines = [f"plan for {spec.name} ({spec.mode}), spec hash {spec.hash}, from {spec.where}", "", "derivation:"]
    for i, s in enumerate(plan.derivation, 1):
        lines.append(f"  {i}. {s.name}: {s.detail}")
    if plan.linear_terms:
        lines += ["", f"linear feature map (F = {sympy.sstr(plan.feature_width())} = {plan.feature_width(d)} at d = {d}):"]
        for t in plan.linear_terms:
            lines.append(f"  position {t.position.describe()}  x  feature {t.feature.describe()}"
                         f"  [width {sympy.sstr(t.width(sympy.Symbol('d')))}]")
    lines += ["", f"cost at n = {n}, d = {d}, chunk = {plan.chunk} (cost = FLOPs + {cost.BALANCE} x bytes):",
              f"  {'ordering':<12} {'legal':<6} {'GFLOP':>10} {'MB':>10} {'cost':>12}  why"]
    for name, legal, f, b, total, reason in cost_table(plan, n, d):
        if legal:
            lines.append(f"  {name:<12} {'yes':<6} {f / 1e9:>10.3f} {b / 1e6:>10.2f} {total:>12.4g}  {reason}")
        else:
            lines.append(f"  {name:<12} {'no':<6} {'-':>10} {'-':>10} {'-':>12}  {reason}")
    lines.append("")
    lines.append(f"chosen: {plan.choice.describe()}")
    lines.append(f"  at n = {n}: {plan.choice.ordering_for(n).value}")
    if plan.choice.crossover is not None:
        lines.append(f"  crossover n* = {plan.choice.crossover:.0f}: {plan.choice.below.value} is cheaper below it, "
                     f"{plan.choice.above.value} above it (the module dispatches on the key length)")
    return "\n".join(lines)


def to_dot(plan: Plan) -> str:
    """The op graph in Graphviz DOT (via networkx + pydot)."""
    g = nx.DiGraph()
    for node, data in plan.graph.nodes(data=True):
        g.add_node(node, label=f"\"{data['label']}\\n[{data['op']}]\"", shape="box")
    g.add_edges_from(plan.graph.edges())
    dot = nx.nx_pydot.to_pydot(g)
    dot.set_name(plan.spec.name)
    return dot.to_string()
