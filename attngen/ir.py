"""The planner's IR: small frozen dataclasses, built by the passes in attngen.plan.

    A(i,j) = mask * W(i,j) * s(q_i, k_j)
    s = sum_t coeff_t * qscale_t(q) * kscale_t(k) * prod_f <a_f(q), b_f(k)>     (FeatureTerm, separable case)
    W = decay(i-j) * sum_r coeff_r * f_r(i) * g_r(j)                               (PositionTerm, separable case)

A linear plan's feature map is the concatenation over (feature term, position term) pairs (LinearTerm) of
f_r(i) * coeff * qscale * (a_1 (x) a_2 (x) ...)(q_i) on the query side and g_r(j) * kscale * (b_1 (x) ...)(k_j)
on the key side (derivations.md section 1). Element formulas are in the element symbols QE / KE.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import sympy


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
        return d ** self.power

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
    graph: object = field(compare=False, repr=False, default=None)  # networkx.DiGraph of ops
    estimator: "Plan | None" = field(compare=False, repr=False, default=None)  # topk_sparse: the estimator's plan

    def candidate(self, ordering: Ordering) -> Candidate:
        return next(c for c in self.candidates if c.ordering == ordering)

    def legal(self, ordering: Ordering) -> bool:
        return self.candidate(ordering).legal

    def feature_width(self, d=None):
        """Total feature width F of the linear plan (sympy in d, or a number for a given d)."""
        from .expr import D
        total = sum((t.width(D) for t in self.linear_terms), sympy.Integer(0))
        return total if d is None else int(total.subs(D, d))

    def explain(self) -> str:
        from .explain import explain
        return explain(self)
