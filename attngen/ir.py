"""The planner's IR: small frozen dataclasses, built by the passes in attngen.passes (see attngen.pipeline).

    A(i,j) = mask * W(i,j) * s(q_i, k_j)
    s = sum_t coeff_t * qscale_t(q) * kscale_t(k) * prod_f <a_f(q), b_f(k)>     (FeatureTerm, separable case)
    W = decay(i-j) * sum_r coeff_r * f_r(i) * g_r(j)                               (PositionTerm, separable case)

A linear plan's feature map is the concatenation over (feature term, position term) pairs (LinearTerm) of
f_r(i) * coeff * qscale * (a_1 (x) a_2 (x) ...)(q_i) on the query side and g_r(j) * kscale * (b_1 (x) ...)(k_j)
on the key side (docs/derivations.md section 1). Element formulas are in the element symbols QE / KE.

A Plan also reads itself out: ``plan.explain()`` is the derivation, the cost table and the choice.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import sympy

from attngen.errors import PlanError
from attngen.frontend.expr import D, vector_width

# the cost model's symbols: N the sequence length, C the chunk size of the causal linear plan
N = sympy.Symbol("N", positive=True)
C = sympy.Symbol("C", positive=True)
# An ordering's cost is FLOPs + BALANCE * bytes: BALANCE is the machine's FLOPs per byte, about 20 for fp32
# CUDA-core work on an H100 (67 TFLOP/s over 3.35 TB/s). The model ranks orderings; it does not predict times.
BALANCE = 20


class Ordering(str, enum.Enum):
    """Evaluation orders (the candidate plans)."""
    QUADRATIC = "quadratic"  # (Q K^T) V, tiled; never materialises n x n
    LINEAR = "linear"  # Q (K^T V); bidirectional: one pass of states; causal: chunked scan
    RECURRENT = "recurrent"  # one token at a time, constant memory (decode)
    FFT = "fft"  # Toeplitz reweighting by FFT convolution along the sequence
    # opt-in approximations (chosen only when the spec's approx asks for them)
    CONV_BASIS = "conv_basis"  # causal softmax through a recovered k-conv basis, applied by FFT
    TOPK_SPARSE = "topk_sparse"  # exact softmax on the top-k key blocks an estimator picks


class Op(str, enum.Enum):
    """Nodes of the op graph."""
    # inputs and outputs
    INPUT = "input"
    OUTPUT = "output"
    # separable orderings
    FEATURE_MAP = "feature_map"  # phi(q) times position factors, fused into the kernels
    ONES_COLUMN = "ones_column"  # [V | 1]: the row sum rides along as one more value column
    STATE_SCAN = "state_scan"  # S = sum_j K'_j^T V_j (chunked and decayed when causal)
    QUERY_STATE = "query_state"  # O = Q' S (+ the intra-chunk tile)
    OUTER = "outer"  # per-position outer products (FFT plan)
    FFT_CONV = "fft_conv"  # convolution along the sequence by FFT
    # approximations
    BASIS_SEARCH = "basis_search"  # conv_basis: probe columns of the masked scores for the basis starts
    ESTIMATE = "estimate"  # topk_sparse: block scores from pooled estimator features
    SELECT = "select"  # topk_sparse: top-k key blocks per query block (+ the always-kept ones)
    # quadratic ordering
    SCORES = "scores"  # s(q_i, k_j) for a tile
    REWEIGHT = "reweight"  # W(i, j) and the mask
    ONLINE_MAX = "online_max"  # running max / sum of the softmax family
    WEIGHTED_SUM = "weighted_sum"  # A V
    # both
    NORMALIZE = "normalize"  # divide by the row sum (eps added or clamped)


class SimilarityClass(str, enum.Enum):
    SEPARABLE = "separable"  # finite sum of products of q-side and k-side features
    EXP = "exp"  # exp(score) with a separable score: the softmax family (running max)
    GENERAL = "general"  # anything else: quadratic only


class ReweightClass(str, enum.Enum):
    NONE = "none"  # W = 1
    SEPARABLE = "separable"  # finite sum of f(i) g(j)
    DECAY = "decay"  # gamma**(i-j) (causal) or gamma**abs(i-j), times a separable remainder
    TOEPLITZ = "toeplitz"  # h(i-j) with no finite separation
    GENERAL = "general"  # anything else


@dataclass(frozen=True)
class FeatureTerm:
    """One separable term of the similarity: coeff * qscale(q) * kscale(k) * prod_f <a_f(q), b_f(k)>."""
    coeff: sympy.Expr  # free of q, k, i, j (may use d, h, parameters)
    q_scale: sympy.Expr  # row scalar of q (Norm(QE) ...), 1 if none
    k_scale: sympy.Expr
    q_factors: tuple  # element formulas in QE; their tensor product is the feature (empty: width 1)
    k_factors: tuple

    @property
    def power(self) -> int:
        return len(self.q_factors)

    def width(self, d):
        """d**power, or the product of the factors' widths where a factor is a matmul(W, .) of width F."""
        out = sympy.Integer(1) if isinstance(d, sympy.Basic) else 1
        for f in self.q_factors:
            out = out * vector_width(f, d)
        return out

    def describe(self) -> str:
        def side(scale, factors, e):
            body = " (x) ".join(f"[{sympy.sstr(f)}]" for f in factors) or "1"
            return body if scale == 1 else f"{sympy.sstr(scale)} * {body}"
        c = "" if self.coeff == 1 else f"{sympy.sstr(self.coeff)} * "
        return f"{c}< {side(self.q_scale, self.q_factors, 'q')} , {side(self.k_scale, self.k_factors, 'k')} >"


@dataclass(frozen=True)
class PositionTerm:
    """One separable position term coeff * f(i) * g(j)."""
    coeff: sympy.Expr  # free of i, j (may use n_q, n_k, h, parameters)
    f_i: sympy.Expr  # expression in i (1 if none)
    g_j: sympy.Expr  # expression in j

    def describe(self) -> str:
        c = "" if self.coeff == 1 else f"{sympy.sstr(self.coeff)} * "
        return f"{c}[{sympy.sstr(self.f_i)}] * [{sympy.sstr(self.g_j)}]"


@dataclass(frozen=True)
class Decay:
    """W = gamma**(i-j) on j <= i; two_sided: gamma**abs(i-j) (two scans when bidirectional)."""
    gamma: sympy.Expr  # free of i, j; per head when it uses h or a per-head parameter
    two_sided: bool


@dataclass(frozen=True)
class Similarity:
    kind: SimilarityClass
    expr: sympy.Expr  # canonical form
    terms: tuple = ()  # of FeatureTerm (separable)
    score: sympy.Expr | None = None  # exp class: s = exp(score)


@dataclass(frozen=True)
class Reweight:
    kind: ReweightClass
    expr: sympy.Expr  # canonical form
    terms: tuple = ()  # of PositionTerm (none, separable, decay remainder)
    decay: Decay | None = None
    kernel: sympy.Expr | None = None  # toeplitz: h(t), t = i - j (symbol T_DIFF)
    log_weight: sympy.Expr | None = None  # log W when W is an exponential (folded into a softmax score)


SDPA_BIAS_LIMIT = 1 << 25  # the largest H * T * S float bias the torch target hands to SDPA (128 MB in fp32)


@dataclass(frozen=True)
class Sdpa:
    """The torch target's quadratic ordering is exactly torch's scaled_dot_product_attention: softmax of
    scale * <q, k> + bias, with scale free of q, k, i, j (a number, or per head) and bias = log W (None: W = 1)
    free of q, k."""
    scale: sympy.Expr
    bias: sympy.Expr | None = None

    def describe(self) -> str:
        bias = "" if self.bias is None else f", float bias {sympy.sstr(self.bias)}"
        return f"scale {sympy.sstr(self.scale)}{bias}"


def is_softmax(similarity: Similarity, normalize) -> bool:
    """Softmax attention: an exp(score) similarity with a row-sum normaliser and no eps."""
    return similarity.kind is SimilarityClass.EXP and normalize.kind == "rowsum" and normalize.eps == 0


def is_softmax_family(similarity: Similarity, reweight: Reweight, normalize) -> bool:
    """Softmax with a reweighting that is none or exp(bias), which folds into the score (ALiBi)."""
    folds = reweight.kind is ReweightClass.NONE or reweight.log_weight is not None
    return is_softmax(similarity, normalize) and folds


@dataclass(frozen=True)
class LinearTerm:
    """One block of the linear plan's feature map: a feature term times a position term."""
    feature: FeatureTerm
    position: PositionTerm

    def width(self, d):
        return self.feature.width(d)


@dataclass(frozen=True)
class Candidate:
    """One ordering in the cost table."""
    ordering: Ordering
    legal: bool
    reason: str  # why it is legal or not
    flops: sympy.Expr | None = None  # in N (length), D (head dim), chunk C
    bytes: sympy.Expr | None = None

    def total(self, head_dim: int, chunk: int):
        """The cost (FLOPs + BALANCE * bytes) as an expression in N."""
        return sympy.expand((self.flops + BALANCE * self.bytes).subs({D: head_dim, C: chunk}))

    def evaluate(self, n: int, head_dim: int, chunk: int) -> tuple:
        """(flops, bytes, cost) at length n, as floats."""
        subs = {N: n, D: head_dim, C: chunk}
        f, b = float(self.flops.subs(subs)), float(self.bytes.subs(subs))
        return f, b, f + BALANCE * b


@dataclass(frozen=True)
class Step:
    """One line of the derivation shown by `attngen plan`."""
    name: str
    detail: str


@dataclass(frozen=True)
class Choice:
    """The chosen ordering, or a dispatch at a crossover length: `below` for n < crossover, else `above`."""
    below: Ordering
    above: Ordering
    crossover: float | None  # None: one ordering at every length
    forced: bool = False

    def ordering_for(self, n: int) -> Ordering:
        if self.crossover is None or n < self.crossover:
            return self.below
        return self.above

    def describe(self) -> str:
        if self.crossover is None:
            return self.below.value + (" (forced)" if self.forced else "")
        return f"{self.below.value} for n < {self.crossover:.0f}, {self.above.value} above"

    def dispatch_length(self, where: str = "") -> float:
        """The key length from which a module holding the quadratic and the linear kernels runs the linear
        ones: the crossover, 0 when linear is chosen at every length, inf for quadratic at every length."""
        if self.crossover is not None:
            if (self.below, self.above) != (Ordering.QUADRATIC, Ordering.LINEAR):
                raise PlanError(f"{where}: the generated modules dispatch quadratic -> linear, not {self.describe()}")
            return float(self.crossover)
        return 0.0 if self.below is Ordering.LINEAR else float("inf")


@dataclass(frozen=True)
class Capabilities:
    """What the backends can do with a plan, recorded by the planning pass ``capabilities``.

    kernels: the orderings whose Triton kernels the plan's generated module holds (empty: no module, see
    ``kernels_reason``); with two it dispatches at ``crossover`` (its default, at head dim
    CROSSOVER_HEAD_DIM; a caller passes the one of its own head dim). decodable: whether the plan has a
    constant-size recurrent state (initial_state, return_state, cu_seqlens, step), else ``decode_reason``
    says why not. length_terms: the linear plan's factors that use the final length (n_q, n_k)."""
    kernels: tuple = ()
    kernels_reason: str = ""
    crossover: float | None = None
    decodable: bool = False
    decode_reason: str = ""
    length_terms: tuple = ()
    shared_state: bool = False  # with grouped KV heads, one state per kv head (the heads of a group hold equal ones)
    shared_reason: str = ""  # why not, when not


CROSSOVER_HEAD_DIM = 64  # the head dim of a generated module's default crossover
DEFAULT_CHUNK = 64  # the chunk size of the causal linear plan


@dataclass(frozen=True)
class Generator:
    """What a code generator expresses, handed to the planning passes by attngen.pipeline (so that no pass
    imports the code generator). ``orderings``: those with templates; ``choosable``: those a plan for this
    target may choose (topk_sparse runs on the quadratic templates' block-sparse kernels); ``check(plan,
    ordering)`` raises PlanError saying why the templates cannot express ``ordering`` for a plan."""
    name: str
    orderings: tuple
    choosable: frozenset
    check: object = field(compare=False, repr=False)


@dataclass(frozen=True)
class Plan:
    spec: object  # attngen.spec.Spec
    similarity: Similarity
    reweight: Reweight
    normalize: object  # attngen.spec.Normalize, after canonicalisation (softmax -> rowsum of exp)
    linear_terms: tuple  # of LinearTerm; empty when the linear ordering is not legal
    candidates: tuple  # of Candidate
    choice: Choice
    derivation: tuple  # of Step
    head_dim: int  # the head dim the costs were evaluated at
    chunk: int  # the chunk size of the causal linear plan
    capabilities: Capabilities = Capabilities()
    estimator: "Plan | None" = field(compare=False, repr=False, default=None)  # topk_sparse: the estimator's plan
    target: str = "torch"  # the backend whose orderings the choice was restricted to
    sdpa: Sdpa | None = None  # torch target: the quadratic ordering delegated to SDPA (attngen.runtime.torch.sdpa)
    # triton target: feature maps the kernels cannot form (attngen.passes.prologue.Prologue); the plan is then the
    # plan of the prologue's core spec, whose q and k are the feature rows
    prologue: object = None
    fused: str = ""  # triton target: the parameters and reductions its kernels evaluate inside feature maps (one line)
    trace: tuple = field(compare=False, repr=False, default=())  # (stage, pass, what it did) per pass
    memo: dict = field(compare=False, repr=False, default_factory=dict)  # per-call values worked out once

    def candidate(self, ordering: Ordering) -> Candidate:
        return next(c for c in self.candidates if c.ordering == ordering)

    def legal(self, ordering: Ordering) -> bool:
        return self.candidate(ordering).legal

    def feature_width(self, d=None):
        """Total feature width F of the linear plan (sympy in d, or a number for a given d; remembered per d)."""
        if d is not None and ("width", d) in self.memo:
            return self.memo["width", d]
        total = sum((t.width(D) for t in self.linear_terms), sympy.Integer(0))
        if d is None:
            return total
        self.memo["width", d] = int(total.subs(D, d))
        return self.memo["width", d]

    def cost_table(self, n: int, head_dim: int | None = None) -> list:
        """Rows (ordering, legal, flops, bytes, cost, reason) at length n."""
        d = head_dim or self.head_dim
        rows = []
        for c in self.candidates:
            if c.legal:
                f, b, total = c.evaluate(n, d, self.chunk)
                rows.append((c.ordering.value, True, f, b, total, c.reason))
            else:
                rows.append((c.ordering.value, False, None, None, None, c.reason))
        return rows

    def explain(self, n: int = 4096, head_dim: int | None = None) -> str:
        """The derivation, the linear feature map, the cost table at length n, the choice and the capabilities."""
        d = head_dim or self.head_dim
        spec = self.spec
        lines = [f"plan for {spec.name} ({spec.mode}), spec hash {spec.hash}, from {spec.where}", "", "derivation:"]
        if self.prologue is not None:  # the plan below is the core spec's, on the feature rows
            lines[1:1] = ["", f"prologue: {self.prologue.describe()}"]
        elif self.fused:
            lines[1:1] = ["", f"fused: {self.fused}"]
        for i, s in enumerate(self.derivation, 1):
            lines.append(f"  {i}. {s.name}: {s.detail}")
        if self.linear_terms:
            lines += ["", f"linear feature map (F = {sympy.sstr(self.feature_width())} = {self.feature_width(d)} "
                          f"at d = {d}):"]
            for t in self.linear_terms:
                lines.append(f"  position {t.position.describe()}  x  feature {t.feature.describe()}"
                             f"  [width {sympy.sstr(t.width(sympy.Symbol('d')))}]")
        lines += ["", f"cost at n = {n}, d = {d}, chunk = {self.chunk} (cost = FLOPs + {BALANCE} x bytes):",
                  f"  {'ordering':<12} {'legal':<6} {'GFLOP':>10} {'MB':>10} {'cost':>12}  why"]
        for name, legal, f, b, total, reason in self.cost_table(n, d):
            if legal:
                lines.append(f"  {name:<12} {'yes':<6} {f / 1e9:>10.3f} {b / 1e6:>10.2f} {total:>12.4g}  {reason}")
            else:
                lines.append(f"  {name:<12} {'no':<6} {'-':>10} {'-':>10} {'-':>12}  {reason}")
        lines.append("")
        lines.append(f"chosen: {self.choice.describe()}")
        lines.append(f"  at n = {n}: {self.choice.ordering_for(n).value}")
        if self.choice.crossover is not None:
            lines.append(f"  crossover n* = {self.choice.crossover:.0f}: {self.choice.below.value} is cheaper below "
                         f"it, {self.choice.above.value} above it (the module dispatches on the key length)")
        cap = self.capabilities
        lines += ["", "capabilities:",
                  "  triton kernels: " + (", ".join(o.value for o in cap.kernels) if cap.kernels
                                          else f"none ({cap.kernels_reason})"),
                  "  decodable: " + ("yes (recurrent state)" if cap.decodable else f"no ({cap.decode_reason})")]
        if cap.length_terms:
            lines.append("  length-dependent terms: " + ", ".join(cap.length_terms))
        return "\n".join(lines)
