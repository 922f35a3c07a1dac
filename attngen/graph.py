"""The op graph of a plan (networkx), built on demand where it is drawn: ``attngen plan --dot FILE``.

Nodes carry ``op`` (an attngen.ir.Op), ``label`` and ``ordering``; a plan that dispatches at a crossover has
the ops of both orderings. Writing DOT needs pydot (the optional extra ``attngen[dot]``).
"""
from __future__ import annotations

import networkx as nx

from attngen.errors import PlanError
from attngen.ir import Op, Ordering, Plan, SimilarityClass


def op_graph(plan: Plan) -> nx.DiGraph:
    """The DAG of the ops of the plan's chosen ordering(s)."""
    g = nx.DiGraph(name=plan.spec.name)
    for ordering in dict.fromkeys((plan.choice.below, plan.choice.above)):
        _add_ops(g, ordering, plan)
    return g


def to_dot(plan: Plan) -> str:
    """The op graph in Graphviz DOT (needs pydot: pip install 'attngen[dot]')."""
    try:
        import pydot  # noqa: F401  (networkx's DOT writer imports it)
    except ImportError:
        raise PlanError("writing the op graph as DOT needs pydot: pip install 'attngen[dot]' (or pip install "
                        "pydot)") from None
    graph = op_graph(plan)
    g = nx.DiGraph()
    for node, data in graph.nodes(data=True):
        g.add_node(node, label=f"\"{data['label']}\\n[{data['op']}]\"", shape="box")
    g.add_edges_from(graph.edges())
    dot = nx.nx_pydot.to_pydot(g)
    dot.set_name(plan.spec.name)
    return dot.to_string()


def _add_ops(g, ordering: Ordering, x: Plan) -> None:
    """Add the ops of ``ordering`` to the networkx DiGraph ``g`` (nodes prefixed by the ordering)."""
    p = ordering.value + "_"
    norm = x.normalize.kind == "rowsum"

    def node(name, op, label):
        g.add_node(p + name, op=op.value, label=label, ordering=ordering.value)
        return p + name

    q, k, v = (node(n, Op.INPUT, n) for n in ("q", "k", "v"))
    out = node("o", Op.OUTPUT, "o")
    if ordering in (Ordering.LINEAR, Ordering.RECURRENT):
        qf = node("phi_q", Op.FEATURE_MAP, "Q' = [f_r(i) phi_r(q)]  " + f"({len(x.linear_terms)} block(s))")
        kf = node("psi_k", Op.FEATURE_MAP, "K' = [g_r(j) psi_r(k)]")
        g.add_edge(q, qf)
        g.add_edge(k, kf)
        vin = v
        if norm:
            vin = node("v_aug", Op.ONES_COLUMN, "[V | 1]")
            g.add_edge(v, vin)
        decay = x.reweight.decay
        scan = node("state", Op.STATE_SCAN,
                    "S = sum K'^T V" + (f" with decay {decay.gamma}" if decay else "")
                    + (" (chunked scan)" if x.spec.causal and ordering is Ordering.LINEAR else ""))
        g.add_edges_from([(kf, scan), (vin, scan)])
        apply = node("apply", Op.QUERY_STATE, "Q' S" + (" + tril(Q'K'^T) V" if x.spec.causal and
                                                          ordering is Ordering.LINEAR else ""))
        g.add_edges_from([(qf, apply), (scan, apply)])
        last = apply
    elif ordering is Ordering.FFT:
        qf = node("phi_q", Op.FEATURE_MAP, "phi(q)")
        kf = node("psi_k", Op.FEATURE_MAP, "psi(k)")
        outer = node("outer", Op.OUTER, "U_j = psi(k_j)^T v_j")
        conv = node("conv", Op.FFT_CONV, f"sum_j h(i-j) U_j by FFT, h(t) = {x.reweight.kernel}")
        apply = node("apply", Op.QUERY_STATE, "phi(q_i) . conv_i")
        g.add_edges_from([(q, qf), (k, kf), (kf, outer), (v, outer), (outer, conv), (conv, apply), (qf, apply)])
        last = apply
    elif ordering is Ordering.CONV_BASIS:
        a = x.spec.approximation
        search = node("search", Op.BASIS_SEARCH, f"k = {a.k} starts s_r by probing columns of mask o scale QK^T "
                                                 f"(probe {a.probe}, {a.search})")
        vin = node("v_aug", Op.ONES_COLUMN, "[V | 1]")
        conv = node("conv", Op.FFT_CONV, "sum_r conv(e_r, m_r) [V | 1] by FFT")
        g.add_edges_from([(q, search), (k, search), (v, vin), (search, conv), (vin, conv)])
        last = conv
    elif ordering is Ordering.TOPK_SPARSE:
        a = x.spec.approximation
        est = node("estimate", Op.ESTIMATE, f"block scores <sum_I phi(q), sum_J psi(k)> ({a.estimator.name}, "
                                             f"block {a.block})")
        sel = node("select", Op.SELECT, f"top-{a.k} key blocks per query block + always-kept")
        sm = node("online_softmax", Op.ONLINE_MAX, "exact softmax over the kept blocks (block-sparse flash)")
        pv = node("pv", Op.WEIGHTED_SUM, "A V over the kept blocks")
        g.add_edges_from([(q, est), (k, est), (est, sel), (sel, sm), (q, sm), (k, sm), (sm, pv), (v, pv)])
        last = pv
    else:
        scores = node("scores", Op.SCORES, "s(q_i, k_j) per tile")
        g.add_edges_from([(q, scores), (k, scores)])
        w = node("weights", Op.REWEIGHT, f"W(i,j) = {x.reweight.expr}" + (" x causal mask" if x.spec.causal else ""))
        g.add_edge(scores, w)
        last = w
        if x.similarity.kind is SimilarityClass.EXP:
            sm = node("online_softmax", Op.ONLINE_MAX, "running max and sum")
            g.add_edge(w, sm)
            last = sm
        pv = node("pv", Op.WEIGHTED_SUM, "A V (tile by tile)")
        g.add_edges_from([(last, pv), (v, pv)])
        last = pv
    if norm:
        nz = node("normalize", Op.NORMALIZE, f"divide by the row sum ({x.normalize.eps_mode} {x.normalize.eps:g})")
        g.add_edge(last, nz)
        last = nz
    g.add_edge(last, out)
