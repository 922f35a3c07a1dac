"""Planning passes: the similarity separated, the reweighting classified, the linear plan's feature map,
a declared approximation checked, every ordering costed, and the choice (see attngen.pipeline)."""
from __future__ import annotations

from dataclasses import replace

import sympy

from attngen.errors import PlanError, SpecError
from attngen.frontend.expr import KE, QE, D, Dot, I, J
from attngen.ir import (
    SDPA_BIAS_LIMIT,
    Choice,
    LinearTerm,
    Ordering,
    ReweightClass,
    Sdpa,
    SimilarityClass,
    is_softmax,
    is_softmax_family,
)
from attngen.passes import cost
from attngen.passes.draft import Draft, with_steps
from attngen.passes.rewrite import classify_reweight, classify_similarity


def separate(x: Draft) -> Draft:
    steps = []
    sim = classify_similarity(x.similarity_expr, steps)
    x = with_steps(x, steps)
    if sim.kind is SimilarityClass.SEPARABLE:
        detail = " + ".join(f"{t.describe()} [width {sympy.sstr(t.width(D))}]" for t in sim.terms)
    elif sim.kind is SimilarityClass.EXP:
        detail = f"exp of the separable score {sympy.sstr(sim.score)}: softmax family (running max)"
    else:
        detail = f"{sympy.sstr(sim.expr)} has no finite separation"
    return x.step(f"similarity: {sim.kind.value}", detail, similarity=sim)


def classify(x: Draft) -> Draft:
    steps = []
    rw = classify_reweight(x.reweight_expr, x.spec.causal, steps, x.spec.where)
    x = with_steps(x, steps)
    parts = [t.describe() for t in rw.terms]
    if rw.decay is not None:
        parts.insert(0, f"decay {sympy.sstr(rw.decay.gamma)}**{'|i-j|' if rw.decay.two_sided else '(i-j)'}"
                     + (" (two scans)" if rw.decay.two_sided else " (one scan)"))
    if rw.kernel is not None:
        parts.append(f"h(t) = {sympy.sstr(rw.kernel)}, t = i - j")
    return x.step(f"reweight: {rw.kind.value}", "; ".join(parts) or sympy.sstr(rw.expr), reweight=rw)


def linear_terms(x: Draft) -> Draft:
    if x.similarity.kind is not SimilarityClass.SEPARABLE or x.reweight.kind not in (
            ReweightClass.NONE, ReweightClass.SEPARABLE, ReweightClass.DECAY):
        return x
    terms = tuple(LinearTerm(f, p) for p in x.reweight.terms for f in x.similarity.terms)
    width = sum((t.width(D) for t in terms), sympy.Integer(0))
    return x.step("linear-terms", f"{len(terms)} feature block(s), total width F = {sympy.sstr(width)}",
                  linear_terms=terms)


def approximate(x: Draft) -> Draft:
    """A declared approximation: check that it applies to this spec (PlanError if not) and plan its estimator."""
    a = x.spec.approximation
    if a is None:
        return x
    where = f"{x.spec.where}: approx ({a.kind})"
    if a.kind == "conv_basis":
        if not (is_softmax(x.similarity, x.normalize) and x.reweight.kind is ReweightClass.NONE):
            raise PlanError(f"{where}: conv_basis approximates causal softmax attention (similarity exp(score), "
                            f"no reweight, normalize rowsum or softmax); {x.spec.name} has a "
                            f"{x.similarity.kind.value} similarity, {x.reweight.kind.value} reweight and "
                            f"normalize {x.normalize.kind}. Fix: remove approx, or declare a softmax spec")
        return x.step("approximate", f"conv_basis with k = {a.k}, probe = {a.probe}, delta = {a.delta:g}, "
                                     f"{a.search} search (approximate; declared by the spec)")
    if not is_softmax_family(x.similarity, x.reweight, x.normalize):
        raise PlanError(f"{where}: topk_sparse computes exact softmax attention on the kept blocks, so it needs a "
                        f"softmax-family spec (similarity exp(score), normalize rowsum or softmax, a reweight that "
                        f"is none or exp(bias)); {x.spec.name} has a {x.similarity.kind.value} similarity, "
                        f"{x.reweight.kind.value} reweight and normalize {x.normalize.kind}")
    est = a.estimator
    try:
        est_plan = x.subplan(est, head_dim=x.head_dim, chunk=x.chunk, force=Ordering.LINEAR)
    except PlanError as exc:
        raise PlanError(f"{where}: the estimator {est.name} must be separable (it is evaluated at linear cost "
                        f"from pooled features): {exc}") from None
    if est_plan.reweight.decay is not None:
        raise PlanError(f"{where}: the estimator {est.name} has a decay reweighting "
                        f"(({sympy.sstr(est_plan.reweight.decay.gamma)})**(i-j)), which does not pool over blocks; "
                        "choose an estimator whose reweighting is none or a finite sum of f(i) g(j)")
    return x.step("approximate", f"topk_sparse: estimator {est.name} (F = {sympy.sstr(est_plan.feature_width())}), "
                                 f"block {a.block}, k = {a.k} key blocks per query block + "
                                 f"{'the diagonal, ' if a.always_keep.diagonal else ''}the first "
                                 f"{a.always_keep.first} (approximate; declared by the spec)",
                  estimator=est_plan)


def costs(x: Draft) -> Draft:
    cands = cost.candidates(x.spec.causal, x.similarity, x.reweight, x.linear_terms)
    width = x.estimator.feature_width() if x.estimator is not None else None
    cands += cost.approximations(x.spec, None, width)
    return replace(x, candidates=cands)


def window(x: Draft) -> Draft:
    """A window [|i - j| < N]: the quadratic ordering only, visiting the key tiles that intersect it (cost ~ T N,
    not T S). The mask is a step function of i - j with no finite separation into sums of f(i) g(j), so the linear
    ordering (and its recurrent state) cannot express it: a state would have to drop each key as it leaves the
    window. The FFT ordering convolves over all 2T lags whatever N is and evaluates its kernel as one smooth
    expression: it is ruled out too."""
    n = x.spec.window
    if n is None:
        return x
    mask = f"[0 <= i - j < {n}]" if x.spec.causal else f"[|i - j| < {n}]"
    why = {
        Ordering.LINEAR: f"the window mask {mask} is not separable (no finite sum of f(i) g(j)): a state "
                         "sum_j K'_j^T V_j cannot drop the keys that leave the window",
        Ordering.RECURRENT: f"the window mask {mask} is not separable: a constant-size state cannot forget the keys "
                            f"that leave the window (its decode state would be a cache of the last {n} keys)",
        Ordering.FFT: f"the window mask {mask} cuts the kernel h(i - j) off at |i - j| = {n}: the FFT ordering "
                      "convolves over all 2T lags with one smooth kernel, at O(T log T) whatever the window",
    }
    flops, data = cost.windowed_quadratic(x.spec.causal, n)
    cands = []
    for c in x.candidates:
        if c.ordering is Ordering.QUADRATIC:
            c = replace(c, reason=f"key tiles outside the window skipped: ~T * min({n}, S) pairs", flops=flops,
                        bytes=data)
        elif c.ordering in why:
            c = replace(c, legal=False, reason=why[c.ordering])
        cands.append(c)
    detail = (f"A(i, j) is masked to {mask} ({n} keys per query{', the diagonal included' if x.spec.causal else ''}"
              f"): the quadratic ordering only, visiting the key tiles that intersect the window (cost "
              f"~ T * min({n}, S) pairs, linear in T); the linear, recurrent and FFT orderings are ruled out (the "
              "mask is not separable)")
    return x.step("window", detail, candidates=tuple(cands), linear_terms=())


def token_inputs(x: Draft) -> Draft:
    """Rotary positions and gates: where they enter, and the orderings a gate rules out (the cost table's reasons).

    Rotary rotates q and k before the similarity, so every ordering sees rotated rows (a linear plan's features
    are then functions of position too). A gate per head multiplies W by exp(G_i - G_j): the causal scan decays
    its state by exp(g_t) per token, the quadratic ordering adds G_i - G_j to a softmax score or multiplies W.
    A gate per key dimension enters each dimension of the dot product: the linear ordering only, and only for
    a similarity whose every separable term is one dot product of width d (degree 1)."""
    spec = x.spec
    if spec.rotary is not None:
        x = x.step("rotary", f"q and k rotated by their positions before the similarity (RoPE, dimension m paired "
                             f"with m + d/2, angle p * {spec.rotary.theta:g}**(-2m/d)); every ordering sees the "
                             "rotated rows, the linear ordering's features are functions of position too; a state "
                             "continues the positions")
    gate = spec.gate
    if gate is None:
        return _generated_orderings(x)
    where = f"{spec.where}: gates.{gate.name}"
    why = {}
    if gate.per == "key_dim":
        if x.similarity.kind is not SimilarityClass.SEPARABLE or any(t.feature.power != 1 for t in x.linear_terms) \
                or not x.linear_terms:
            raise SpecError(f"a per-key-dimension gate needs a separable similarity whose every term is one dot "
                            f"product of q-side and k-side features of width d; {spec.name} has "
                            f"{sympy.sstr(x.similarity.expr)} ({x.similarity.kind.value})", where=where,
                            expected="e.g. similarity: dot(q, k) * scale, or dot(elu(q) + 1, elu(k) + 1)",
                            fix="use a per-head gate (gates: {g: head}), or a degree-1 similarity")
        why[Ordering.QUADRATIC] = "a per-key-dimension gate weights each dimension of the dot product by its own " \
                                  "exp(G_id - G_jd): there is no T x S score matrix to tile"
        detail = (f"{gate.name} [B, H, T, Dk] per key dimension: the linear ordering decays the state row by row, "
                  f"S_t = diag(exp({gate.name}_t)) S_(t-1) + K'_t^T V_t; chunks use chunk-local cumulative sums "
                  "(every exponent <= 0)")
    else:
        where_in = ("the softmax score gains G_i - G_j" if x.similarity.kind is SimilarityClass.EXP
                    else "the quadratic ordering multiplies W by exp(G_i - G_j)")
        detail = (f"{gate.name} [B, H, T] per head, G its cumulative sum: {where_in}"
                  + ("; the linear ordering decays the state by exp(g_t) per token, chunks use chunk-local "
                     "cumulative sums (every exponent <= 0)" if x.linear_terms else ""))
    why[Ordering.FFT] = "a gate breaks the Toeplitz structure (exp(G_i - G_j) is not a function of i - j)"
    cands = tuple(replace(c, legal=False, reason=why[c.ordering]) if c.ordering in why and c.legal else c
                  for c in x.candidates)
    return _generated_orderings(x.step("gates", detail, candidates=cands))


def _generated_orderings(x: Draft) -> Draft:
    """For the generator's target, a spec chooses among the orderings the templates generate for it (each refusal
    said: a tensor power of degree 3 gets a quadratic-only module, the quadratic kernels apply a gate to a softmax
    score only, ...); when none is generated, the capabilities pass raises the refusal."""
    if x.available is None or x.generator is None or x.target != x.generator.name or x.force is not None:
        return x
    available = set(x.available)

    def legal(o):
        return all(c.legal for c in x.candidates if c.ordering is o) and (o is not Ordering.LINEAR or x.linear_terms)
    options = [o for o in (Ordering.LINEAR, Ordering.QUADRATIC) if o in available and legal(o)]
    for o in options:
        try:
            x.generator.check(x, o)
        except PlanError as exc:
            if len([a for a in options if a in available]) > 1:  # another one runs (else the capabilities pass
                available.discard(o)  # raises this refusal)
                x = x.step("generated", f"{x.target}: not the {o.value} ordering ({str(exc).split(': ', 1)[-1]})")
    return replace(x, available=frozenset(available))


def choose_ordering(x: Draft) -> Draft:
    if x.force is not None:
        cand = next(c for c in x.candidates if c.ordering == x.force)
        if not cand.legal:
            raise PlanError(f"{x.spec.where}: plan={x.force.value!r} is not legal for {x.spec.name} "
                            f"({x.spec.mode}): {cand.reason}")
        _check_available(x, [x.force])
        choice = Choice(x.force, x.force, None, forced=True)
        return x.step("choose", f"{x.force.value} (forced by the caller)", choice=choice)
    a = x.spec.approximation
    if a is not None:  # declared by the spec: chosen, with the exact orderings' costs shown beside it
        _check_available(x, [Ordering(a.kind)])
        choice = Choice(Ordering(a.kind), Ordering(a.kind), None)
        return x.step("choose", f"{a.kind}: declared by the spec's approx (approximate; exact orderings are "
                                "listed in the cost table; force one with plan=...)", choice=choice)
    cands = x.candidates
    note = ""
    if x.available is not None:
        legal = [c.ordering for c in cands if c.legal and c.ordering not in (Ordering.RECURRENT, *cost.APPROXIMATE)]
        _check_available(x, legal, any_of=True)
        cands = tuple(c for c in cands if c.ordering in x.available)
        note = " [backend implements: " + ", ".join(sorted(o.value for o in x.available)) + "]"
    choice, why = cost.choose(cands, x.head_dim, x.chunk)
    return x.step("choose", why + note, choice=choice)


def delegate(x: Draft) -> Draft:
    """torch target: when the quadratic ordering is exactly SDPA's operator (softmax of c * <q, k> + log W, c free
    of q, k, i, j, log W free of q, k, row sums without eps), it runs torch.nn.functional
    .scaled_dot_product_attention (a float bias of H x T x S elements up to SDPA_BIAS_LIMIT; the tiled ordering
    past it); everything SDPA cannot express stays tiled."""
    if x.target != "torch" or Ordering.QUADRATIC not in (x.choice.below, x.choice.above):
        return x
    why = _not_sdpa(x) or ("the gate adds G_i - G_j (a bias with a gradient) to the score"
                           if x.spec.gate is not None else "") or (
        f"the window skips the key tiles outside |i - j| < {x.spec.window} (SDPA would visit all T x S pairs)"
        if x.spec.window is not None else "")
    if why:
        return x.step("delegate", f"the quadratic ordering runs attngen's tiles: {why}")
    score = x.similarity.score
    scale = score / Dot(QE, KE)  # a Mul with the Dot factor cancels it; anything else keeps a Dot
    bias = None if x.reweight.kind is ReweightClass.NONE else x.reweight.log_weight
    sdpa = Sdpa(scale, bias)
    limit = (f"; tiled above {SDPA_BIAS_LIMIT} bias elements (H x T x S) and when the bias needs a gradient"
             if bias is not None else "")
    return x.step("delegate", f"the quadratic ordering runs torch's scaled_dot_product_attention ({sdpa.describe()})"
                              f"{limit}", sdpa=sdpa)


def _not_sdpa(x: Draft) -> str:
    """Why the quadratic ordering is not SDPA's operator ('' when it is)."""
    if x.similarity.kind is not SimilarityClass.EXP:
        return "the similarity is not an exponential (not a softmax)"
    if x.normalize.kind != "rowsum" or x.normalize.eps != 0:
        return "the normalisation is not a plain row sum (SDPA has no eps)"
    score = x.similarity.score
    scale = score / Dot(QE, KE)  # a Mul with the Dot factor cancels it; anything else keeps a Dot
    if scale.has(QE, KE, I, J) or scale.atoms(Dot) or any(a.has(QE, KE) for a in scale.atoms(sympy.Function)):
        return f"the score {sympy.sstr(score)} is not a constant times dot(q, k)"
    if x.reweight.kind is not ReweightClass.NONE:
        lw = x.reweight.log_weight
        if lw is None or lw.has(QE, KE):
            return "the reweighting is not exp(a bias of positions)"
    return ""


def _check_available(x: Draft, orderings, any_of=False):
    if x.available is None:
        return
    missing = [o for o in orderings if o not in x.available]
    if (any_of and len(missing) == len(orderings)) or (not any_of and missing):
        have = ", ".join(sorted(o.value for o in x.available)) or "none"
        raise PlanError(f"{x.spec.where}: the backend implements {have} for {x.spec.name} ({x.spec.mode}), "
                        f"not {', '.join(o.value for o in missing)}; use backend='torch', or force an "
                        f"ordering it implements")


def ordering(value, spec) -> Ordering:
    if isinstance(value, Ordering):
        return value
    try:
        return Ordering(value)
    except ValueError:
        raise PlanError(f"plan={value!r} for {spec.name}: expected one of "
                        + ", ".join(o.value for o in Ordering) + " or None (let the planner choose)") from None
