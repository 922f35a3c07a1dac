"""The shared host runtime of the generated Triton modules.

A generated module holds its header, its ``@triton.jit`` kernels, a declarative record of itself (``Module``:
spec name, mode, parameters and their defaults, the feature width, the chunk, the crossover, the kernel
handles) and thin public functions (``<name>_attention``, ``<name>_step``, ``<name>_attention_block_sparse``)
that call ``attention``, ``step`` and ``block_sparse`` here. Everything else lives in this one file: the input
checks (through attngen.runtime.validate, the one validator), the launch drivers of the linear, decay and
quadratic orderings and of the decode step, block sizes, buffer allocation (one ``_empty``: the tests poison it
with NaN), the torch.library custom ops of each module (registered once per process under the record's op
name) with their fake kernels and autograd formulas, the dispatch at the crossover, recurrent states, packed
sequences and block-sparse tables.

This file is plain Python, not a template: changing it regenerates no module and changes no template hash.
It imports nothing from attngen but the validator and the errors, relatively, so ``attngen build
--standalone`` can copy it (as attngen_host/runtime/triton/host.py) beside generated modules that then run
without attngen installed.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from ...errors import InputError
from .. import validate

QBLOCK = 64  # query rows and key columns of a quadratic tile (half that for head dims above 128: registers)


# ---------------------------------------------------------------------------------------------
# the record a generated module declares
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """A parameter: shape [H] (per_head) or [], a vector [H, Dk] / [Dk] (``vector``: one value per element of q and
    k, read by the fused feature maps), or a table [H, buckets] / [buckets] (read by lookup in the quadratic
    kernels), and its default: a number (every entry), a function of the head dim (the per-call scale's
    1/sqrt(d)), or None (required)."""
    name: str
    per_head: bool = False
    default: object = None
    buckets: int = 0
    vector: bool = False
    rows: int = 0  # a matrix [H, rows, Dk] / [rows, Dk] (fused matmul feature maps, Module.vec_width)
    fixed: bool = False  # a fixed matrix (learnable: false): the kernels form no gradient for it

    @property
    def shape(self) -> tuple:
        """Its shape with H as the string 'H' (and the head dim as 'Dk')."""
        if self.rows:
            return (("H",) if self.per_head else ()) + (self.rows, "Dk")
        return (("H",) if self.per_head else ()) + (("Dk",) if self.vector else ()) + \
            ((self.buckets,) if self.buckets else ())

    def sized(self, heads: int, head_dim: int) -> tuple:
        """Its shape at H = heads, Dk = head_dim."""
        return tuple(heads if s == "H" else head_dim if s == "Dk" else s for s in self.shape)


@dataclass(frozen=True)
class Decay:
    """The decay class gamma**(i-j) (causal) or gamma**|i-j| (two_sided): ``kernel`` computes gamma per head and
    d log(gamma) / d p for the parameters ``params`` (in that order); ``gamma`` is its formula, for messages."""
    kernel: object
    gamma: str
    two_sided: bool = False
    params: tuple = ()


@dataclass(frozen=True)
class Chunked:
    """The causal linear ordering in parallel over chunks: ``h`` stores the state before every chunk (one
    sequential pass), ``o`` computes every chunk's output at once; ``dh`` stores the state gradient after every
    chunk (one reverse pass), ``dqkv`` every chunk's dq, dk, dv at once."""
    h: object
    o: object
    dh: object
    dqkv: object


@dataclass(frozen=True)
class Linear:
    """The linear ordering's kernels and sizes. The feature width at head dim d is
    width[0] + width[1] * d + width[2] * d**2; ``length_terms``: position terms that use n_q / n_k (a state
    would go stale); ``max_power_dim``: the largest head dim of tensor-power features (None: no limit)."""
    fwd: object
    bwd_dq: object
    bwd_dkv: object
    step: object = None
    chunk: int = 64
    width: tuple = (0, 1, 0)
    length_terms: tuple = ()
    max_power_dim: Optional[int] = None
    decay: Optional[Decay] = None
    chunked: Optional[Chunked] = None


@dataclass(frozen=True)
class Quadratic:
    """The quadratic ordering's kernels; ``flash``: the softmax family (online softmax, the log-sum-exp saved,
    a block-sparse mode with blocks of 16 .. sparse_max_block)."""
    fwd: object
    bwd_dq: object
    bwd_dkv: object
    flash: bool = False
    sparse_max_block: int = 128


@dataclass(frozen=True)
class Module:
    """What a generated module is: its spec, mode, op name (unique per spec, mode, orderings and hashes), its
    parameters, whether it normalises by row sums, and its orderings. With both orderings the public function
    runs the quadratic one for key lengths below ``crossover`` (the planner's, at head dim 64)."""
    spec: str
    mode: str
    op_name: str
    spec_hash: str = ""
    params: tuple = ()
    normalised: bool = False
    linear: Optional[Linear] = None
    quadratic: Optional[Quadratic] = None
    crossover: Optional[float] = None
    max_length: object = None  # the spec's max_length (positions 0 .. max_length - 1): an int, f(n_q, n_k) or None
    gate: Optional[str] = None  # the keyword of a gate (log decays [B, H, T]): an input of every call
    gate_dim: bool = False  # the gate is per key dimension ([B, H, T, Dk], GLA)
    rotary: Optional[float] = None  # theta of rotary positions (RoPE, rotate-half pairs), applied in the kernels
    fp32_features: bool = False  # feature maps computed in the kernels: fp32 dot operands for half inputs too
    # fused matmul feature maps: the width of q', k' that the kernels compute from the raw rows of head dim Dk
    # (their constexprs K = vec_width, D = Dk); 0: the kernels' K is the head dim
    vec_width: int = 0

    def limit(self, n_q, n_k):
        """max_length at lengths n_q, n_k (None: no limit)."""
        return int(self.max_length(n_q, n_k)) if callable(self.max_length) else self.max_length

    @property
    def causal(self) -> bool:
        return self.mode == "causal"

    @property
    def stateful(self) -> bool:
        """Whether initial_state, return_state, cu_seqlens and the decode step are available."""
        return self.causal and self.linear is not None and not self.linear.length_terms

    @property
    def qstat(self) -> bool:
        """Whether the quadratic forward saves a row statistic (log-sum-exp or normaliser)."""
        return self.quadratic is not None and (self.quadratic.flash or self.normalised)

    def feature_width(self, dk: int) -> int:
        """F, the width of the feature map Q', K' at head dim ``dk``: the rows of a state S [N, H, F, Dv]."""
        a, b, c = self.linear.width
        dk = self.vec_width or dk
        return a + b * dk + c * dk * dk


# ---------------------------------------------------------------------------------------------
# launch options tuned on a GPU: num_warps and num_stages per kernel and key, never per sequence length
# ---------------------------------------------------------------------------------------------
AUTOTUNE = os.environ.get("ATTNGEN_AUTOTUNE", "1") != "0"  # ATTNGEN_AUTOTUNE=0: the host's choice, untuned
TUNE_CONFIGS = ((4, 2), (4, 3), (8, 2), (8, 3))  # (num_warps, num_stages) tried besides the host's choice


class Tuned:
    """A generated kernel whose launch options are tuned on a CUDA device: ``kernel[grid](*args, **meta)`` with
    the host's choice of num_warps / num_stages in ``meta`` (its hint: what `attngen aot` checks fits) runs,
    the first time a key is seen, every candidate (the hint and TUNE_CONFIGS) with triton.testing.do_bench,
    and keeps the fastest for that key. The key is the constexprs and flags (head dims, block sizes, USE_S0,
    VARLEN, ...) and the tensors' dtypes: not the sequence length, the batch or the packed lengths, which are
    runtime arguments, so a new length or varlen batch never re-tunes. A candidate that does not fit the
    device (OutOfResources) is skipped. Under the interpreter, on a CPU, or with AUTOTUNE off: the hint."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.fn = kernel.fn
        self.best = {}  # key -> (num_warps, num_stages)

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args, meta, bench=None):
        hint = (meta.pop("num_warps", 4), meta.pop("num_stages", 3))
        if AUTOTUNE and _on_device(args):
            key = (tuple(sorted(meta.items())), tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
            if key not in self.best:
                self.best[key] = self._tune(grid, args, meta, hint, bench)
            hint = self.best[key]
        return self.kernel[grid](*args, **meta, num_warps=hint[0], num_stages=hint[1])

    def _tune(self, grid, args, meta, hint, bench=None):
        bench = bench or (lambda fn: triton.testing.do_bench(fn, warmup=5, rep=20))
        timings = {}
        for w, s in dict.fromkeys((hint, *TUNE_CONFIGS)):
            try:
                timings[(w, s)] = bench(lambda: self.kernel[grid](*args, **meta, num_warps=w, num_stages=s))
            except OutOfResources:  # more shared memory or registers than the device has: never chosen
                continue
        return min(timings, key=timings.get) if timings else hint


def _on_device(args) -> bool:
    """Whether a launch runs natively on a CUDA device (not under the interpreter): where tuning means something."""
    return os.environ.get("TRITON_INTERPRET") != "1" and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)


def _tuned(record):
    """``record`` (a Module or one of its parts) with every kernel handle wrapped in Tuned."""
    changes = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, triton.runtime.jit.KernelInterface):
            changes[f.name] = Tuned(value)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _tuned(value)
    return dataclasses.replace(record, **changes)


def register(m: Module) -> Module:
    """``m`` with its kernels tuned on a GPU (Tuned); create its custom ops (once per process: a second module
    with the same op name reuses them)."""
    m = _tuned(m)
    if m.linear is not None and m.op_name + "_fwd" not in _OPS:
        _OPS[m.op_name + "_fwd"], _OPS[m.op_name + "_bwd"] = _linear_ops(m)
    if m.quadratic is not None and m.op_name + "_qfwd" not in _OPS:
        _OPS[m.op_name + "_qfwd"], _OPS[m.op_name + "_qbwd"] = _quadratic_ops(m)
    return m


_OPS: dict = {}  # op name (with its _fwd, _bwd, _qfwd, _qbwd suffix) -> the registered custom op


# ---------------------------------------------------------------------------------------------
# the public functions (the generated wrappers call these)
# ---------------------------------------------------------------------------------------------
def attention(m: Module, q, k, v, initial_state=None, return_state=False, cu_seqlens=None, layout="bhtd",
              crossover=None, params=None):
    """o for q, k, v (layout "bhtd" [B, H, T, D] or "bthd" [B, T, H, D]); with ``return_state``, (o, (S, z,
    pos)). ``initial_state`` (S, z, pos) continues sequences, ``cu_seqlens`` packs them along T (B = 1): the
    causal mode's linear ordering only. A module with both orderings runs the quadratic one for key lengths
    below ``crossover`` when none of the three is given."""
    qh, _, _ = validate.qkv(q, k, v, layout, name=m.spec, causal=m.causal, limits=validate.TRITON)
    stateless = initial_state is None and not return_state and cu_seqlens is None
    if m.linear is None and not stateless:
        raise InputError(f"{m.spec}: initial_state / return_state / cu_seqlens need a recurrent state, and "
                         "this module runs the quadratic ordering only (no linear form: its decode state would "
                         "be the KV cache); call it on whole sequences (pad or loop over packed ones)")
    B, H, T, K = qh.shape
    ps = _params(m, params, H, q) + _gate(m, params, (B, H, T, K), layout, q)
    if stateless:
        S = validate.bhtd(k, layout).shape[2]
        validate.positions(max(T, S), max_length=m.limit(T, S), spec=m.spec, what=m.spec)
        crossover = m.crossover if crossover is None else crossover
        # the quadratic kernels also take head dims the linear ones' tensor-power features are not generated for
        wide = m.linear is not None and m.linear.max_power_dim is not None and K > m.linear.max_power_dim
        if m.quadratic is not None and (m.linear is None or wide or validate.bhtd(k, layout).shape[2] < crossover):
            o, _, _ = _OPS[m.op_name + "_qfwd"](q, k, v, ps, layout, None, 0)
            return o
        _check_linear(m, K, validate.bhtd(k, layout).shape[1] != H)
        o, _, _, _ = _OPS[m.op_name + "_fwd"](q, k, v, ps, layout, [], None, False)
        return o
    _refuse_states(m, "initial_state / return_state / cu_seqlens")
    _check_linear(m, K, validate.bhtd(k, layout).shape[1] != H)
    cu = None if cu_seqlens is None else validate.cu_seqlens(cu_seqlens, batch=B, length=T, device=q.device)
    n = _sequences(B, cu)
    state = [] if initial_state is None else _state(m, initial_state, n, H, K, validate.bhtd(v, layout).shape[3],
                                                     q.device, "initial_state")
    consumed = cu[1:] - cu[:-1] if cu is not None else torch.full((n,), T, dtype=torch.int64, device=q.device)
    pos = consumed + (state[-1] if state else 0)
    if m.max_length is not None:
        last = int(pos.max())
        validate.positions(pos, max_length=m.limit(last, last), spec=m.spec, what=m.spec)
    o, _, st, zt = _OPS[m.op_name + "_fwd"](q, k, v, ps, layout, state, cu, bool(return_state))
    if not return_state:
        return o
    return o, (st, zt if m.normalised else None, pos)


def attention_lse(m: Module, q, k, v, layout="bhtd", params=None):
    """(o, lse) of a softmax module's quadratic (flash) kernels: o as ``attention`` returns it, but in fp32 for
    fp16 / bf16 inputs (the copy the forward keeps for its backward: a caller combining several outputs rounds
    once; its gradient joins do's), and lse [B, H, T] fp32, the log row sum log sum_j W_ij exp(s_ij) the forward
    saves for its backward (-inf on rows that attend no key; the kernels store +inf there, which zeroes
    exp(s - lse) in the backward). Gradients flow back through lse: its gradient dlse_i adds p_ij dlse_i to ds_ij,
    i.e. the backward's D_i = dO_i . O_i becomes D_i - dlse_i."""
    if m.quadratic is None or not m.quadratic.flash:
        raise InputError(f"{m.spec}: a log row sum (lse) is kept by the flash kernels of a softmax module (an exp "
                         "similarity with a row sum and no eps); this module has none")
    qh, kh, _ = validate.qkv(q, k, v, layout, name=m.spec, causal=m.causal, limits=validate.TRITON)
    B, H, T, K = qh.shape
    validate.positions(max(T, kh.shape[2]), max_length=m.limit(T, kh.shape[2]), spec=m.spec, what=m.spec)
    ps = _params(m, params, H, q) + _gate(m, params, (B, H, T, K), layout, q)
    o, stat, wide = _OPS[m.op_name + "_qfwd"](q, k, v, ps, layout, None, 0)
    return (wide if wide.numel() else o), torch.where(stat == float("inf"), float("-inf"), stat)


def step(m: Module, q_t, k_t, v_t, S, z, pos, layout="bhtd", params=None):
    """One decode step of the recurrent form: (o_t, S, z, pos) with new state tensors; no gradients."""
    _refuse_states(m, "the decode step")
    qh, _, vh = validate.qkv(q_t, k_t, v_t, layout, name=m.spec, causal=m.causal, limits=validate.TRITON)
    B, H, T, K = qh.shape
    if T != 1:
        raise InputError(f"{m.spec}_step: expected one token per sequence (T = 1), found T = {T}; run "
                         f"{m.spec}_attention with initial_state= for a chunk of tokens")
    _check_linear(m, K, validate.bhtd(k_t, layout).shape[1] != H)
    state = _state(m, (S, z, pos), B, H, K, vh.shape[3], q_t.device, "state")
    if m.max_length is not None:
        last = int(state[-1].max()) + 1
        validate.positions(state[-1] + 1, max_length=m.limit(last, last), spec=m.spec, what=f"{m.spec}_step")
    ps = _params(m, params, H, q_t) + _gate(m, params, (B, H, T, K), layout, q_t)
    with torch.no_grad():
        return _step(m, q_t, k_t, v_t, state, [p.detach() for p in ps], layout)


def block_sparse(m: Module, q, k, v, kv_blocks, block, layout="bhtd", params=None):
    """o over the key blocks ``kv_blocks`` [B, H, NQB, MAXK] lists for each block of ``block`` query rows."""
    qh, kh, _ = validate.qkv(q, k, v, layout, name=m.spec, causal=m.causal, limits=validate.TRITON)
    B, H, T, _ = qh.shape
    tab = validate.kv_blocks(kv_blocks, block, batch=B, heads=H, length=T, key_length=kh.shape[2],
                             device=q.device, max_block=m.quadratic.sparse_max_block)
    ps = _params(m, params, H, q) + _gate(m, params, tuple(qh.shape), layout, q)
    o, _, _ = _OPS[m.op_name + "_qfwd"](q, k, v, ps, layout, tab, block)
    return o


def _params(m: Module, values, heads, like):
    """The parameter tensors in the record's order: the given values validated, the defaults filled in."""
    values = values or {}
    out = []
    for p in m.params:
        value = values.get(p.name)
        if value is None:
            if p.default is None:
                raise InputError(f"{m.spec}: parameter {p.name!r} has no constant default; pass {p.name}=tensor")
            default = p.default(like.shape[-1]) if callable(p.default) else p.default  # a function of the head dim
            value = torch.full(p.sized(heads, like.shape[-1]), default, dtype=torch.float32, device=like.device)
        if p.fixed and isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
            raise InputError(f"{m.spec}: parameter {p.name!r} is fixed (learnable: false) and the fused kernels "
                             "form no gradient for it, but the tensor passed requires one. Fix: pass "
                             f"{p.name}.detach(), or declare it learnable in the spec")
        out.append(validate.parameter(p.name, value, per_head=p.per_head, heads=heads, like=like, spec=m.spec,
                                      shape=p.sized(heads, like.shape[-1]) if p.buckets or p.vector or p.rows
                                      else None))
    return out


def _gate(m: Module, values, shape, layout, like):
    """[the gate as a contiguous fp32 [B, H, T] tensor] for a gated module (it rides at the end of the parameter
    list through the custom ops, and its gradient comes back there), else []."""
    if m.gate is None:
        return []
    value = (values or {}).get(m.gate)
    if value is None:
        raise InputError(f"{m.spec}: missing the gate {m.gate}= (log decays <= 0, [B, H, T] for layout 'bhtd', "
                         "[B, T, H] for 'bthd')")
    g = validate.gate(m.gate, value, per_dim=m.gate_dim, shape=shape, layout=layout, like=like, spec=m.spec)
    return [g.to(torch.float32).contiguous()]


def _check_linear(m: Module, dk, grouped=False):
    """InputError where the linear kernels cannot run: tensor-power features beyond their head dims, grouped KV
    heads (the quadratic kernels read them in place; the linear ones do not yet)."""
    validate.power_dim(dk, name=m.spec, max_power_dim=m.linear.max_power_dim)
    if grouped and not m.causal:
        raise InputError(f"{m.spec}: grouped KV heads (k, v with fewer heads than q) are read by the quadratic and "
                         "the causal linear kernels, not by the bidirectional linear ones yet; use "
                         "attngen.compile(..., backend='torch'), or repeat k and v per group")


def _refuse_states(m: Module, what):
    """InputError unless this module can carry a recurrent state (causal, no length-dependent terms)."""
    if not m.causal:
        raise InputError(f"{m.spec} (bidirectional): {what} needs the causal mode's recurrent form; a "
                         "bidirectional op reads the whole sequence at once (build the spec with causal=True)")
    if m.linear.length_terms:
        raise InputError(f"{m.spec}: {what} is refused because its position terms use the final sequence "
                         f"length ({', '.join(m.linear.length_terms)}): a state computed now would be wrong once the "
                         "sequence grows. Fix the length constant as a number, e.g. "
                         "load_spec(\"cosformer\", M=4096)")


def _state(m: Module, state, n, h, dk, dv, device, what):
    """The list [S, z, pos] (row sums) or [S, pos] of a state tuple (S, z, pos) (or an object with the
    attributes S, z, pos, such as attngen's State), validated."""
    S, z, pos = validate.state_parts(state, what=what)
    validate.state_tensors(S, z, pos, batch=n, heads=h, width=m.feature_width(dk), dv=dv, device=device,
                           normalised=m.normalised, spec=m.spec, what=what)
    return [S, z, pos] if m.normalised else [S, pos]


# ---------------------------------------------------------------------------------------------
# buffers, views and launch arguments
# ---------------------------------------------------------------------------------------------
def _empty(shape, like, dtype=None):
    """Every buffer the kernels write comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _bhtd(x, layout):
    """A [B, H, T, D] view of ``x`` (stored in ``layout``) with unit stride along D."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.transpose(1, 2) if layout == "bthd" else x


def _like_layout(b, h, t, d, like, layout, dtype=None):
    """A new buffer stored in ``layout`` and its [B, H, T, D] view."""
    shape = (b, t, h, d) if layout == "bthd" else (b, h, t, d)
    x = _empty(shape, like, dtype)
    return x, _bhtd(x, layout)


def _strides(*xs):
    return [s for x in xs for s in x.stride()[:3]]


FP32_PRECISION = "ieee"  # tl.dot's input_precision for fp32 inputs: "ieee" (exact products) or "tf32" / "tf32x3"


def _precision(x, m: Module):
    """input_precision of every tl.dot: FP32_PRECISION for fp32 inputs (set it to "tf32" for tensor cores at
    fp32's range and 10 mantissa bits), and for every input of a module whose feature maps are computed in the
    kernels (fp32_features: its dot operands stay fp32, the features are not rounded to half); fp16 / bf16
    operands ignore it (their own tensor-core path)."""
    if FP32_PRECISION not in ("ieee", "tf32", "tf32x3"):
        raise InputError(f"host.FP32_PRECISION = {FP32_PRECISION!r}: expected 'ieee', 'tf32' or 'tf32x3'")
    return FP32_PRECISION if x.dtype == torch.float32 or m.fp32_features else "tf32"


def _params_f32(params):
    return [p.detach().to(torch.float32).contiguous() for p in params]


def _dummy(like):
    """A pointer argument that the kernel does not read (its flag is off)."""
    return torch.zeros(1, dtype=torch.float32, device=like.device)


STATE_BUDGET = 2048  # fp32 state elements [rows, BV] one linear-ordering program keeps in registers
VEC_BT = 16  # chunk rows of modules with fused matmul feature maps (Module.vec_width): see _blocks
THREAD_VALUES = 96  # fp32 tile values per thread a program may hold before it takes 8 warps instead of 4


def _kdims(m: Module, K: int) -> dict:
    """The linear kernels' head-dim constexprs for raw rows of head dim K: K, and with fused matmul feature maps
    K = the width of q', k' and D, BD the raw rows' (Module.vec_width)."""
    if not m.vec_width:
        return dict(K=K)
    return dict(K=m.vec_width, D=K, BD=max(16, triton.next_power_of_2(K)))


def _blocks(m: Module, t, dk, dv, dtype=None):
    """BT, BK, BV and num_warps of the linear kernels: chunks of BT rows (32 at head dims above 64, 16 for
    features of 256 and more: four [BT, BK] fp32 tiles must stay in registers), every feature column of a term in
    one block (BK; the in-chunk product Q'K'^T needs all of them), and BV value columns per program, the most (up to 64)
    that keep the program's recurrent state [rows, BV] within STATE_BUDGET fp32 values (rows: the feature width
    at BK). Programs split V (grid cdiv(V, BV) x sequences x heads); the backward adds their partial dq, dk.
    num_warps: 8 when the tiles (raw and mapped q, k per feature block, the chunk's [BT, BT] product, the state,
    v and o) would pass THREAD_VALUES per thread at 4 warps, else 4. fp16 inputs keep the state's operand in fp32
    (SDT, kernel_macros.j2): above head dim 64 their chunks are 16 rows (at 32 the fused forward spilled 20-48 B
    on sm_90). Fused matmul feature maps (vec_width): chunks of VEC_BT = 16 rows and 8 warps (with maxnreg,
    _warps); at 64 rows their fp32 dots (FMA: the operands replicated per thread), the raw [BT, BD] blocks and the
    W tile [F, BD] spilled up to 45 KB on sm_90 (performer's causal backward at head dim 128), at 32 up to 2.4 KB,
    at 16 (one stage, _warps) up to 700 B and 0 B in most kernels (attngen aot,
    bench/results/2026-11-30-aot-fused-matmul.md)."""
    bk = max(16, triton.next_power_of_2(m.vec_width or dk))
    rows = max(bk, m.feature_width(bk))
    bt = min(m.linear.chunk, max(16, triton.next_power_of_2(t)))
    if rows >= 256 or m.gate_dim:  # tensor-power features: [BT, BK * BK] tiles; a gate per key dimension: the
        bt = 16  # chunk's pairs weigh each dimension, [BT, BT, BK]
    elif bk > 64:
        bt = min(bt, 16 if dtype == torch.float16 else 32)
    if m.vec_width:  # fused matmul feature maps: raw [BT, BD] blocks, the W tile [F, BD] and fp32 FMA dots on top
        bt = min(bt, VEC_BT)
    fit = 1 << max(4, (STATE_BUDGET // rows).bit_length() - 1)  # the largest power of two <= budget / rows, >= 16
    bv = min(64, fit, max(16, triton.next_power_of_2(dv)))
    values = bt * bk * 2 + bt * rows * 2 + bt * bt + rows * bv + 2 * bt * bv
    if m.gate_dim:  # the chunk's pairs per key dimension, [BT, BT, BK]
        values += bt * bt * bk
    return bt, bk, bv, (4 if values <= THREAD_VALUES * 128 and not m.vec_width else 8)


MAXNREG = 255  # ptxas's register limit for modules with fused matmul feature maps (see _warps)


def _warps(m: Module, w: int) -> dict:
    """The launch options num_warps (``w``, from _blocks) and, for modules with fused matmul feature maps
    (vec_width), num_stages = 1 and maxnreg = MAXNREG: without an explicit limit ptxas (CUDA 13.4, sm_90)
    compiled some of their kernels (performer's causal bwd_dq / bwd_dkv at head dim 128, BT 32) with 32
    registers and spilled 9-12 KB; with .maxnreg 255 they use 255 and spill 1-2.4 KB (attngen aot). maxnreg is
    Triton's own launch option of CUDA targets: not passed under a ROCm build of torch, whose Triton backend would
    refuse the keyword."""
    if not m.vec_width:
        return dict(num_warps=w)
    # num_stages 1: the chunk loop's loads not software-pipelined; at 2-3 stages their buffers spilled more
    # (performer's causal bwd_dkv at head dim 128: 1580 B at 3, 700 B at 1). A hint: Tuned tries 2 and 3 on a GPU
    opts = dict(num_warps=w, num_stages=1)
    return dict(opts, maxnreg=MAXNREG) if torch.version.hip is None else opts


SCAN = "auto"  # the causal linear scan: "fused" (one pass per sequence), "parallel" (over chunks) or "auto"
PARALLEL_PROGRAMS = 264  # "auto": the chunk-parallel scan when the fused one has fewer programs (2 x 132 SMs)
PARALLEL_CHUNKS = 4  # ... and the sequences at least this many chunks


def _parallel(m: Module, programs: int, t: int, bt: int) -> bool:
    """Whether the causal linear ordering runs in parallel over chunks: SCAN, or with "auto" when the fused
    scan would run fewer than PARALLEL_PROGRAMS programs over at least PARALLEL_CHUNKS chunks (long sequences,
    few sequences and heads). The decode step and modules without chunked kernels (the two-sided decay class)
    are fused; modules without a fused forward (tensor-power features) run the chunk-parallel forward whatever
    SCAN says."""
    if SCAN not in ("auto", "fused", "parallel"):
        raise InputError(f"host.SCAN = {SCAN!r}: expected 'auto', 'fused' or 'parallel'")
    if m.rotary is not None and m.linear.chunked is not None:  # rotary positions: the chunk kernels only
        return True
    if m.linear.chunked is None or SCAN == "fused":
        return False
    return SCAN == "parallel" or (programs < PARALLEL_PROGRAMS and triton.cdiv(t, bt) >= PARALLEL_CHUNKS)


def _fused_forward_fits(m: Module, bk: int, dtype) -> bool:
    """Whether the fused causal forward runs without register spills (attngen aot, sm_90): not for fp16 inputs
    (the state's operand stays fp32) with feature maps of 256 columns or more above head dim 64 (cosFormer's
    two terms at head dim 128 spilled 20 B at every num_warps / num_stages); those take the chunk-parallel
    forward, whose two passes each hold part of the tiles. Modules without a fused forward (tensor powers)
    never reach here."""
    return not (dtype == torch.float16 and bk > 64 and m.feature_width(bk) >= 256)


def _chunks(n: int, t: int, cu, bt: int, device):
    """ci [NC, 2] int32, (sequence, chunk) of every chunk of every sequence, and co [N + 1] int32, the first
    chunk of each sequence: the global numbering of the chunk-parallel kernels."""
    lengths = [t] * n if cu is None else (cu[1:] - cu[:-1]).tolist()
    per = [triton.cdiv(x, bt) for x in lengths]
    co = [0]
    for c in per:
        co.append(co[-1] + c)
    ci = [(i, c) for i, count in enumerate(per) for c in range(count)]
    return (torch.tensor(ci, dtype=torch.int32, device=device).reshape(-1, 2),
            torch.tensor(co, dtype=torch.int32, device=device), co[-1])


def _chunk_states(m: Module, kh, vh, params, state, cu, co, n_c, n, store, st, zt, meta, like, gam=()):
    """h [NC, H, F, V] and hz [NC, H, F] (fp32; hz empty without row sums): the state before every chunk; the
    final state into st, zt when ``store``. ``gam``: (gamma [H],) for the decay class, else ()."""
    H, T, K = like.shape[1], kh.shape[2], kh.shape[3]  # like: q as [B, H, T, K] (k may have fewer heads)
    V, F = vh.shape[3], m.feature_width(K)
    h = _empty((n_c, H, F, V), like, torch.float32)
    hz = _empty((n_c, H, F) if m.normalised else (0,), like, torch.float32)
    s0, z0, pos = _state_args(m, state, like)
    m.linear.chunked.h[(triton.cdiv(V, meta["BV"]), n * H)](
        kh, vh, s0, z0, pos, cu if cu is not None else _dummy(like), co, h, hz, st, zt, *gam,
        *_rope(m, state, T, K, meta["BK"], like), *_params_f32(params), *_strides(kh, vh), T, H, F, float(T),
        float(T), float(K), float(H), H // kh.shape[1], **meta, USE_S0=bool(state), STORE_ST=store,
        VARLEN=cu is not None)
    return h, hz


def _rope(m: Module, state, t: int, K: int, BK: int, like):
    """The rotary tables (cos, sin) of a linear call covering every position it reaches (from the states' pos);
    () without rotary positions."""
    if m.rotary is None:
        return ()
    return _rotary_tables(m, t + (int(state[-1].max()) if state else 0), K, BK, like)


def _partial(n_v, shape, out, like):
    """Where the V blocks write dq (or dk): ``out`` itself (stride 0) when V is one block, else an fp32 buffer
    [n_v, *shape] whose blocks the caller sums: (target, its extra stride, buffer or None)."""
    if n_v == 1:
        return out, 0, None
    buf = _empty((n_v, *shape), like, torch.float32)
    return buf[0], buf.stride(0), buf


# ---------------------------------------------------------------------------------------------
# recurrent states (causal mode): S [N, H, F, Dv], z [N, H, F] (row-sum specs), pos [N] int64
# ---------------------------------------------------------------------------------------------
def _sequences(batch, cu):
    """N, the number of sequences: the batch, or the packed sequences of cu_seqlens."""
    return batch if cu is None else cu.shape[0] - 1


def _state_args(m: Module, state, like):
    """Kernel arguments s0, z0, pos of a validated state list ([S, z, pos] or [S, pos]; [] for none)."""
    if not state:
        return _dummy(like), _dummy(like), _dummy(like)
    z0 = state[1].contiguous() if m.normalised else _dummy(like)
    return state[0].contiguous(), z0, state[-1].contiguous()


def _state_outputs(m: Module, n, h, f, dv, like, state, wanted):
    """Buffers for the final state S [N, H, F, Dv] and z [N, H, F] (in the initial state's dtype, else
    fp32); empty when not ``wanted`` (z also without row sums)."""
    dtype = state[0].dtype if state else torch.float32
    if not wanted:
        return _empty((0,), like, dtype), _empty((0,), like, dtype)
    z = _empty((n, h, f), like, dtype) if m.normalised else _empty((0,), like, dtype)
    return _empty((n, h, f, dv), like, dtype), z


# ---------------------------------------------------------------------------------------------
# the linear ordering: launch drivers
# ---------------------------------------------------------------------------------------------
def _fwd(m: Module, q, k, v, params, layout, state, cu, return_state):
    """o [layout of q, Dv], the normaliser den' [B, H, T] (fp32; empty without row sums) and the final
    state S [N, H, F, Dv], z [N, H, F] (empty unless ``return_state``; z also without row sums)."""
    if m.gate is not None:
        return _gated_fwd(m, q, k, v, params, layout, state, cu, return_state)
    if m.linear.decay is not None:
        return _decay_fwd(m, q, k, v, params, layout, state, cu, return_state)
    qh, kh, vh = (_bhtd(x, layout) for x in (q, k, v))
    B, H, T, K = qh.shape
    S, V = kh.shape[2], vh.shape[3]
    o, oh = _like_layout(B, H, T, V, q, layout)
    den = _empty((B, H, T) if m.normalised else (0,), q, torch.float32)
    BT, BK, BV, W = _blocks(m, max(T, S), K, V, q.dtype)
    if not m.causal:
        m.linear.fwd[(triton.cdiv(V, BV), B * H)](
            qh, kh, vh, oh, den, *_params_f32(params), *_strides(qh, kh, vh, oh),
            T, S, H, float(T), float(S), float(K), float(H),
            **_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W))
        return o, den, _empty((0,), q, torch.float32), _empty((0,), q, torch.float32)
    n, F = _sequences(B, cu), m.feature_width(K)
    st, zt = _state_outputs(m, n, H, F, V, q, state, return_state)
    NV = triton.cdiv(V, BV)
    if m.linear.fwd is None or not _fused_forward_fits(m, BK, q.dtype) or _parallel(m, NV * n * H, T, BT) \
            or kh.shape[1] != H:  # grouped KV heads: the chunk kernels read them
        meta = dict(**_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W))
        _chunk_fwd(m, qh, kh, vh, oh, den, params, state, cu, n, st, zt, return_state, meta)
        return o, den, st, zt
    m.linear.fwd[(NV, n * H)](
        qh, kh, vh, oh, den, *_state_args(m, state, q), cu if cu is not None else _dummy(q),
        st if return_state else _dummy(q), zt if return_state and m.normalised else _dummy(q),
        *_params_f32(params), *_strides(qh, kh, vh, oh), T, H, F, float(T), float(S), float(K), float(H),
        **_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W),
        USE_S0=bool(state), STORE_ST=bool(return_state), VARLEN=cu is not None)
    return o, den, st, zt


def _chunk_fwd(m: Module, qh, kh, vh, oh, den, params, state, cu, n, st, zt, return_state, meta, gam=()):
    """The causal forward in parallel over chunks into oh (and den): the states before every chunk, then every
    chunk's output at once. ``gam``: (gamma [H],) for the decay class, else ()."""
    H, T, K = qh.shape[1], qh.shape[2], qh.shape[3]
    ci, co, NC = _chunks(n, T, cu, meta["BT"], qh.device)
    h, hz = _chunk_states(m, kh, vh, params, state, cu, co, NC, n, bool(return_state),
                          st if return_state else _dummy(qh), zt if return_state and m.normalised else _dummy(qh),
                          meta, qh, gam)
    m.linear.chunked.o[(triton.cdiv(meta["V"], meta["BV"]), NC, H)](
        qh, kh, vh, oh, den, h, hz, _state_args(m, state, qh)[2], cu if cu is not None else _dummy(qh), ci, *gam,
        *_rope(m, state, T, K, meta["BK"], qh), *_params_f32(params), *_strides(qh, kh, vh, oh), T, H,
        m.feature_width(K), float(T), float(kh.shape[2]), float(K), float(H), H // kh.shape[1], **meta,
        USE_S0=bool(state), VARLEN=cu is not None)


def _bwd(m: Module, do, q, k, v, o, den, params, layout, state, cu, dst, dzt):
    """[dq, dk, dv, d<param>..., dS_0, dz_0] for the incoming gradients ``do`` of ``o`` and ``dst``, ``dzt``
    of the final state (None: zero); dS_0, dz_0 only with an initial ``state`` (dz_0 with row sums)."""
    if m.gate is not None:
        return _gated_bwd(m, do, q, k, v, o, den, params, layout, state, cu, dst, dzt)
    if m.linear.decay is not None:
        return _decay_bwd(m, do, q, k, v, o, den, params, layout, state, cu, dst, dzt)
    qh, kh, vh, doh, oh = (_bhtd(x, layout) for x in (q, k, v, do, o))
    B, H, T, K = qh.shape
    S, V = kh.shape[2], vh.shape[3]
    groups = H // kh.shape[1]
    dq, dqh = _like_layout(B, H, T, K, q, layout)
    dk, dkh, dv, dvh = _kv_grads(B, H, S, K, V, k, v, layout, groups)
    pf = _params_f32(params)
    BT, BK, BV, W = _blocks(m, max(T, S), K, V, q.dtype)
    NV = triton.cdiv(V, BV)
    if m.normalised:  # D_i = sum_e dO_ie O_ie split by V block: [NV, B, H, T] (each block's kernels take its share)
        prod = (doh.float() * oh.float()).reshape(B, H, T, V)
        prod = torch.nn.functional.pad(prod, (0, NV * BV - V))
        delta = prod.view(B, H, T, NV, BV).sum(-1).permute(3, 0, 1, 2).contiguous()
        s_dd = B * H * T
    else:
        delta, s_dd = den, 0
    meta = dict(**_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W))
    dq_to, s_dqn, dq_buf = _partial(NV, (B, H, T, K), dqh, q)
    dk_to, s_dkn, dk_buf = _partial(NV, (B, H, S, K), dkh, q)
    if m.causal:
        n, F = _sequences(B, cu), m.feature_width(K)
        dpar_q, dpar_k = _dpar(m, params, NV * n * H, q), _dpar(m, params, NV * n * H, q)
        s0, z0, pos = _state_args(m, state, q)
        ds0 = _empty(state[0].shape, state[0]) if state else _dummy(q)
        dz0 = _empty((NV, *state[1].shape), state[1]) if state and m.normalised else _dummy(q)  # per V block
        use_dst = dst is not None
        dst = dst.contiguous() if use_dst else _dummy(q)
        dzt = dzt.contiguous() if use_dst and m.normalised else _dummy(q)
        cu_arg = cu if cu is not None else _dummy(q)
        lengths = (T, H, F, float(T), float(S), float(K), float(H))
        flags = dict(USE_S0=bool(state), VARLEN=cu is not None)
        if _parallel(m, NV * n * H, T, BT) or groups > 1:  # the forward's states recomputed, not kept
            ci, co, NC = _chunks(n, T, cu, BT, q.device)
            h, hz = _chunk_states(m, kh, vh, params, state, cu, co, NC, n, False, _dummy(q), _dummy(q), meta, qh)
            g = _empty((NC, H, F, V), q, torch.float32)
            gz = _empty((NV, NC, H, F) if m.normalised else (0,), q, torch.float32)  # per V block
            rot = _rope(m, state, T, K, BK, qh)
            m.linear.chunked.dh[(NV, n * H)](
                qh, doh, den, delta, s_dd, pos, cu_arg, co, g, gz, dst, dzt, ds0, dz0, *rot, *pf, *_strides(qh, doh),
                *lengths, **meta, USE_DST=use_dst, **flags)
            dpar_q = _dpar(m, params, NV * NC * H, q)
            dpar_k = [torch.zeros_like(a) for a in dpar_q]
            m.linear.chunked.dqkv[(NV, NC, H)](
                qh, kh, vh, doh, den, delta, s_dd, dq_to, dk_to, dvh, h, hz, g, gz, pos, cu_arg, ci, *rot, *pf,
                *dpar_q, *_strides(qh, kh, vh, doh, dq_to, dk_to, dvh), s_dqn, s_dkn, *lengths, groups, **meta,
                **flags)
        else:
            m.linear.bwd_dq[(NV, n * H)](
                qh, kh, vh, doh, den, delta, s_dd, dq_to, s0, z0, pos, cu_arg, *pf, *dpar_q,
                *_strides(qh, kh, vh, doh, dq_to), s_dqn, *lengths, **meta, **flags)
            m.linear.bwd_dkv[(NV, n * H)](
                qh, kh, vh, doh, den, delta, s_dd, dk_to, dvh, pos, cu_arg, dst, dzt, ds0, dz0, *pf, *dpar_k,
                *_strides(qh, kh, vh, doh, dk_to, dvh), s_dkn, *lengths, **meta, USE_DST=use_dst, **flags)
        dstate = ([ds0, dz0.sum(0)] if m.normalised else [ds0]) if state else []
    else:
        dpar_q, dpar_k = _dpar(m, params, NV * B * H, q), _dpar(m, params, NV * B * H, q)
        lengths = (T, S, H, float(T), float(S), float(K), float(H))
        m.linear.bwd_dq[(NV, B * H)](
            qh, kh, vh, doh, den, delta, s_dd, dq_to, *pf, *dpar_q, *_strides(qh, kh, vh, doh, dq_to), s_dqn, *lengths,
            **meta)
        m.linear.bwd_dkv[(NV, B * H)](
            qh, kh, vh, doh, den, delta, s_dd, dk_to, dvh, *pf, *dpar_k, *_strides(qh, kh, vh, doh, dk_to, dvh), s_dkn,
            *lengths, **meta)
        dstate = []
    for buf, out in ((dq_buf, dqh), (dk_buf, dkh)):
        if buf is not None:
            out.copy_(buf.sum(0))
    dk, dv = _group_sum(dk, dkh, k, layout, groups), _group_sum(dv, dvh, v, layout, groups)
    dparams = [_dpar_total(r, p, a + b, H, K) for r, p, a, b in zip(m.params, params, dpar_q, dpar_k)]
    return [dq, dk, dv, *dparams, *dstate]


def _dpar(m: Module, params, slots: int, like) -> list:
    """Per parameter, a buffer for the partial sums of its gradient that ``slots`` programs store (a vector
    parameter's: K entries each, K = like's head dim)."""
    d = like.shape[-1]
    return [_empty((1 if r.fixed else slots * (d if r.vector else r.rows * d if r.rows else 1),), like, torch.float32)
            for r in m.params[:len(params)]]


def _dpar_total(r: Param, p, part, H: int, K: int):
    """A parameter's gradient from the programs' partial sums ``part`` (slots ordered with the head fastest):
    summed over the programs, and over the heads for a parameter shared by them."""
    if r.fixed:  # a fixed matrix: no gradient formed
        return torch.zeros_like(p)
    if r.rows:
        total = part.view(-1, H, r.rows, K).sum(0)  # [H, rows, K]
        return (total if p.dim() == 3 else total.sum(0)).to(p.dtype)
    if r.vector:
        total = part.view(-1, H, K).sum(0)  # [H, K]
        return (total if p.dim() == 2 else total.sum(0)).to(p.dtype)
    total = part.view(-1, H).sum(0)  # [H]
    return (total if p.dim() == 1 else total.sum()).to(p.dtype)


def _kv_grads(B, H, S, K, V, k, v, layout, groups):
    """dk, its [B, H, S, K] view, dv, its view: in k's and v's layout, or (grouped KV heads) fp32 buffers per
    query head that _group_sum adds up per group."""
    if groups > 1:
        dkh, dvh = (_empty((B, H, S, d), k, torch.float32) for d in (K, V))
        return None, dkh, None, dvh
    dk, dkh = _like_layout(B, H, S, K, k, layout)
    dv, dvh = _like_layout(B, H, S, V, v, layout)
    return dk, dkh, dv, dvh


def _group_sum(out, per_head, x, layout, groups):
    """The gradient of k or v (``x``): ``out`` itself, or (grouped) the per-query-head buffer summed per group."""
    if groups == 1:
        return out
    B, H, S, D = per_head.shape
    hk = H // groups
    res, view = _like_layout(B, hk, S, D, x, layout)
    view.copy_(per_head.view(B, hk, groups, S, D).sum(2))
    return res


def _step(m: Module, q, k, v, state, params, layout):
    """One decode step: o_t [layout, T = 1], and the new S, z, pos (the inputs are left as they are)."""
    qh, kh, vh = (_bhtd(x, layout) for x in (q, k, v))
    B, H, _, K = qh.shape
    V = vh.shape[3]
    S, pos = state[0].contiguous(), state[-1].contiguous()
    z = state[1].contiguous() if m.normalised else None
    o, oh = _like_layout(B, H, 1, V, q, layout)
    s_out = _empty(S.shape, S)
    z_out = _empty(z.shape, z) if m.normalised else None
    if m.gate is not None:  # this token's log decay per sequence and head
        gam, params = params[-1].reshape(-1), params[:-1]
    else:
        gam = _gamma(m, params, H, 1, 1, K, q)[0] if m.linear.decay is not None else _dummy(q)
    _, BK, BV, W = _blocks(m, 1, K, V, q.dtype)
    m.linear.step[(triton.cdiv(V, BV), B * H)](
        qh, kh, vh, oh, S, z if m.normalised else _dummy(q), pos, s_out, z_out if m.normalised else _dummy(q), gam,
        *_rope(m, [pos], 1, K, BK, q), *_params_f32(params), *_strides(qh, kh, vh, oh), H, m.feature_width(K), 1.0,
        1.0, float(K), float(H), H // kh.shape[1], **_kdims(m, K), V=V, BT=1, BK=BK, BV=BV, **_warps(m, W))
    return o, s_out, z_out, pos + 1


# ---------------------------------------------------------------------------------------------
# the decay class: gamma per head from its kernel, a causal scan and (two-sided) an anti-causal one
# ---------------------------------------------------------------------------------------------
def _gamma(m: Module, params, H, T, S, K, like):
    """gamma [H] (fp32) and d log(gamma) / d parameter [H] per parameter; refuses gamma outside (0, 1]."""
    decay = m.linear.decay
    gam = _empty((H,), like, torch.float32)
    dlg = [_empty((H,), like, torch.float32) for _ in decay.params]
    decay.kernel[(1,)](gam, *dlg, *_params_f32(params), H, float(T), float(S), float(K), float(H),
                       BH=max(16, triton.next_power_of_2(H)))
    ok = (gam > 0) & (gam <= 1)
    if not bool(ok.all()):
        raise InputError(f"{m.spec}: the decay gamma = {decay.gamma} must lie in (0, 1] (gamma > 1 grows "
                         f"without bound); found {gam.tolist()} for heads 0..{H - 1}; pass parameters that "
                         "keep it in range")
    return gam, dlg


def _decay_fwd(m: Module, q, k, v, params, layout, state, cu, return_state):
    """o [layout of q, Dv]; the second output (a normaliser) is empty: the decay class has none; then
    the final state S [N, H, F, Dv] (empty unless ``return_state``) and an empty z."""
    two_sided, kernel = m.linear.decay.two_sided, m.linear.fwd
    qh, kh, vh = (_bhtd(x, layout) for x in (q, k, v))
    B, H, T, K = qh.shape
    S, V = kh.shape[2], vh.shape[3]
    gam, _ = _gamma(m, params, H, T, S, K, q)
    o, oh = _like_layout(B, H, T, V, q, layout)
    BT, BK, BV, W = _blocks(m, max(T, S), K, V, q.dtype)
    n, F = _sequences(B, cu), m.feature_width(K)
    grid = (triton.cdiv(V, BV), n * H)
    pf = _params_f32(params)
    lengths = (T, S, H, F, float(T), float(S), float(K), float(H))
    meta = dict(**_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W))
    acc = _empty((B, H, T, V), q, torch.float32) if two_sided else oh
    st, _ = _state_outputs(m, n, H, F, V, q, state, return_state)
    s0, _, pos = _state_args(m, state, q)
    cu_arg = cu if cu is not None else _dummy(q)
    flags = dict(USE_S0=bool(state), STORE_ST=bool(return_state), VARLEN=cu is not None)
    if not two_sided and (_parallel(m, grid[0] * grid[1], T, BT) or kh.shape[1] != H):
        _chunk_fwd(m, qh, kh, vh, oh, _dummy(q), params, state, cu, n, st, _dummy(q), return_state, meta, (gam,))
        return o, _empty((0,), q, torch.float32), st, _empty((0,), q, st.dtype)
    # the causal scan (into acc when the anti-causal one follows), then the anti-causal scan adding it
    dest = acc if two_sided else oh
    kernel[grid](qh, kh, vh, dest, acc, gam, s0, pos, cu_arg, st if return_state else _dummy(q),
                 *pf, *_strides(qh, kh, vh, dest), *lengths, REV=0, ACC=0, **meta, **flags)
    if two_sided:
        kernel[grid](qh, kh, vh, oh, acc, gam, s0, pos, cu_arg, _dummy(q), *pf,
                     *_strides(qh, kh, vh, oh), *lengths, REV=1, ACC=1, **meta,
                     USE_S0=False, STORE_ST=False, VARLEN=False)
    return o, _empty((0,), q, torch.float32), st, _empty((0,), q, st.dtype)


def _decay_bwd(m: Module, do, q, k, v, o, den, params, layout, state, cu, dst, dzt):
    """[dq, dk, dv, d<param>..., dS_0]; dL/dlog(gamma) from per-program partial sums, reduced here; dS_0
    only with an initial ``state``; ``dst`` is the final state's incoming gradient (None: zero)."""
    decay = m.linear.decay
    qh, kh, vh, doh = (_bhtd(x, layout) for x in (q, k, v, do))
    B, H, T, K = qh.shape
    S, V = kh.shape[2], vh.shape[3]
    gam, dlg_dpar = _gamma(m, params, H, T, S, K, q)
    groups = H // kh.shape[1]
    dq, dqh = _like_layout(B, H, T, K, q, layout)
    dk, dkh, dv, dvh = _kv_grads(B, H, S, K, V, k, v, layout, groups)
    pf = _params_f32(params)
    BT, BK, BV, W = _blocks(m, max(T, S), K, V, q.dtype)
    NV = triton.cdiv(V, BV)
    n, F = _sequences(B, cu), m.feature_width(K)
    lengths = (T, S, H, F, float(T), float(S), float(K), float(H))
    s0, _, pos = _state_args(m, state, q)
    ds0 = _empty(state[0].shape, state[0]) if state else _dummy(q)
    use_dst = dst is not None
    dst = dst.contiguous() if use_dst else _dummy(q)
    cu_arg = cu if cu is not None else _dummy(q)
    meta = dict(**_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W))
    scans = (0, 1) if decay.two_sided else (0,)
    dq_to, s_dqn, dq_buf = _partial(NV, (B, H, T, K), dqh, q)
    dk_to, s_dkn, dk_buf = _partial(NV, (B, H, S, K), dkh, q)
    if decay.two_sided:  # fp32 partial gradients of the causal scan (per V block), added by the anti-causal one
        accq, acck = _empty((NV, B, H, T, K), q, torch.float32), _empty((NV, B, H, S, K), q, torch.float32)
        accv = _empty((B, H, S, V), q, torch.float32)
    else:
        accq, acck, accv = _dummy(q), _dummy(q), _dummy(q)
    if not decay.two_sided and (_parallel(m, NV * n * H, T, BT) or groups > 1):
        scans = ()
        dlg, dpar = _decay_chunk_bwd(m, qh, kh, vh, doh, dq_to, dk_to, dvh, s_dqn, s_dkn, params, state, cu, dst,
                                     ds0, use_dst, gam, n, meta)
    else:
        dlg = _empty((len(scans), NV * n * H), q, torch.float32)
        dpar = [_dpar(m, params, NV * n * H, q) for _ in range(2 * len(scans))]
    for rev in scans:
        last = rev == scans[-1]
        if last:
            out_q, out_k, out_v, sq, sk = dq_to, dk_to, dvh, s_dqn, s_dkn
        else:
            out_q, out_k, out_v, sq, sk = accq[0], acck[0], accv, accq.stride(0), acck.stride(0)
        # the initial and final states belong to the causal scan (rev = 0; a causal op has only that one)
        flags = dict(USE_S0=bool(state) and rev == 0, USE_DST=use_dst and rev == 0, VARLEN=cu is not None)
        m.linear.bwd_dq[(NV, n * H)](
            qh, kh, vh, doh, out_q, accq, gam, dlg[rev], s0, pos, cu_arg, dst, *pf, *dpar[2 * rev],
            *_strides(qh, kh, vh, doh, out_q), sq, *lengths, REV=rev, ACC=int(rev == 1), **meta, **flags)
        m.linear.bwd_dkv[(NV, n * H)](
            qh, kh, vh, doh, out_k, out_v, acck, accv, gam, pos, cu_arg, dst, ds0, *pf, *dpar[2 * rev + 1],
            *_strides(qh, kh, vh, doh, out_k, out_v), sk, *lengths, REV=rev, ACC=int(rev == 1), **meta, **flags)
    for buf, out in ((dq_buf, dqh), (dk_buf, dkh)):
        if buf is not None:
            out.copy_(buf.sum(0))
    dk, dv = _group_sum(dk, dkh, k, layout, groups), _group_sum(dv, dvh, v, layout, groups)
    dlg_total = dlg.sum(0).view(-1, H).sum(0)  # [H] dL/dlog(gamma)
    dparams = []
    for i, p in enumerate(params):
        total = _dpar_total(m.params[i], p, sum(d[i] for d in dpar), H, K)
        name = m.params[i].name
        if name in decay.params:  # a number parameter [H] or []
            total = total + _dpar_total(m.params[i], p, dlg_total * dlg_dpar[decay.params.index(name)], H, K)
        dparams.append(total)
    return [dq, dk, dv, *dparams, *([ds0] if state else [])]


def _decay_chunk_bwd(m: Module, qh, kh, vh, doh, dq_to, dk_to, dvh, s_dqn, s_dkn, params, state, cu, dst, ds0,
                     use_dst, gam, n, meta):
    """The causal decay backward in parallel over chunks (dq, dk, dv into the given targets, dS_0 into ds0):
    ``dlg`` [1, NV * NC * H] and ``dpar`` (per parameter, [NV * NC * H]) partial sums as the fused scans give
    them. dL/dlog(gamma) = sum_i i Q'_i.dQ'_i - sum_j j K'_j.dK'_j from the kernels (positions from each
    sequence's start), plus the initial state's pairs <dS_0, S_0> and the final state's (T_n - 1) <dS_T, S_T>."""
    H, T, K = qh.shape[1], qh.shape[2], qh.shape[3]
    V, F, like = vh.shape[3], m.feature_width(K), qh
    ci, co, NC = _chunks(n, T, cu, meta["BT"], like.device)
    NV = triton.cdiv(V, meta["BV"])
    s_t = _empty((n, H, F, V), like, torch.float32) if use_dst else _dummy(like)
    h, hz = _chunk_states(m, kh, vh, params, state, cu, co, NC, n, use_dst, s_t, _dummy(like), meta, like, (gam,))
    g = _empty((NC, H, F, V), like, torch.float32)
    s0, _, pos = _state_args(m, state, like)
    cu_arg = cu if cu is not None else _dummy(like)
    lengths = (T, H, F, float(T), float(kh.shape[2]), float(K), float(H))
    flags = dict(USE_S0=bool(state), VARLEN=cu is not None)
    none = _dummy(like)
    rot = _rope(m, state, T, K, meta["BK"], like)
    m.linear.chunked.dh[(NV, n * H)](
        qh, doh, none, none, 0, pos, cu_arg, co, g, none, dst, none, ds0, none, gam, *rot, *_params_f32(params),
        *_strides(qh, doh), *lengths, **meta, USE_DST=use_dst, **flags)
    dlg = _empty((1, NV * NC * H), like, torch.float32)
    dpar = [_dpar(m, params, NV * NC * H, like)]
    m.linear.chunked.dqkv[(NV, NC, H)](
        qh, kh, vh, doh, none, none, 0, dq_to, dk_to, dvh, h, hz, g, none, pos, cu_arg, ci, gam, *rot, dlg,
        *_params_f32(params), *dpar[0], *_strides(qh, kh, vh, doh, dq_to, dk_to, dvh), s_dqn, s_dkn, *lengths,
        H // kh.shape[1], **meta, **flags)
    ends = torch.zeros(H, dtype=torch.float32, device=like.device)
    if state:  # the initial state sits at position -1: its pairs have the distance i + 1, the kernels count i
        ends += (ds0.float() * s0.float()).sum((-1, -2)).sum(0)
    if use_dst:  # the final state reads at the sequence's last row T_n - 1
        t_n = torch.full((n,), float(T), device=like.device) if cu is None else (cu[1:] - cu[:-1]).float()
        ends += ((t_n - 1)[:, None] * (dst.float() * s_t).sum((-1, -2))).sum(0)
    dlg[0, :H] += ends  # any slot: the host sums them per head
    return dlg, dpar


# ---------------------------------------------------------------------------------------------
# gates: a log decay per token and head (the last entry of the parameter list), the chunk-parallel scan only
# ---------------------------------------------------------------------------------------------
def _gated_fwd(m: Module, q, k, v, params, layout, state, cu, return_state):
    """o, an empty normaliser, the final state S (empty unless ``return_state``) and an empty z: the chunk-parallel
    scan with the chunk-local weights of docs/derivations.md section 9 (the gate is params[-1], [B, H, T] fp32)."""
    gate, params = params[-1], params[:-1]
    qh, kh, vh = (_bhtd(x, layout) for x in (q, k, v))
    B, H, T, K = qh.shape
    V = vh.shape[3]
    o, oh = _like_layout(B, H, T, V, q, layout)
    BT, BK, BV, W = _blocks(m, T, K, V, q.dtype)
    n, F = _sequences(B, cu), m.feature_width(K)
    st, _ = _state_outputs(m, n, H, F, V, q, state, return_state)
    meta = dict(**_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W))
    _chunk_fwd(m, qh, kh, vh, oh, _dummy(q), params, state, cu, n, st, _dummy(q), return_state, meta, (gate,))
    return o, _empty((0,), q, torch.float32), st, _empty((0,), q, st.dtype)


def _gated_bwd(m: Module, do, q, k, v, o, den, params, layout, state, cu, dst, dzt):
    """[dq, dk, dv, d<param>..., dgate, dS_0]. dL/dG_t = Q'_t.dQ'_t - K'_t.dK'_t per token from the kernels, plus
    <dS_T, S_T> at each sequence's last token, then dgate = the reverse cumulative sum within each sequence
    (docs/derivations.md section 9)."""
    gate, params = params[-1], params[:-1]
    qh, kh, vh, doh = (_bhtd(x, layout) for x in (q, k, v, do))
    B, H, T, K = qh.shape
    V, F = vh.shape[3], m.feature_width(K)
    groups = H // kh.shape[1]
    dq, dqh = _like_layout(B, H, T, K, q, layout)
    dk, dkh, dv, dvh = _kv_grads(B, H, T, K, V, k, v, layout, groups)
    BT, BK, BV, W = _blocks(m, T, K, V, q.dtype)
    NV = triton.cdiv(V, BV)
    n = _sequences(B, cu)
    meta = dict(**_kdims(m, K), V=V, BT=BT, BK=BK, BV=BV, PREC=_precision(q, m), **_warps(m, W))
    dq_to, s_dqn, dq_buf = _partial(NV, (B, H, T, K), dqh, q)
    dk_to, s_dkn, dk_buf = _partial(NV, (B, H, T, K), dkh, q)
    ds0 = _empty(state[0].shape, state[0]) if state else _dummy(q)
    use_dst = dst is not None
    dst = dst.contiguous() if use_dst else _dummy(q)
    like = qh
    ci, co, NC = _chunks(n, T, cu, BT, like.device)
    s_t = _empty((n, H, F, V), like, torch.float32) if use_dst else _dummy(like)
    h, hz = _chunk_states(m, kh, vh, params, state, cu, co, NC, n, use_dst, s_t, _dummy(like), meta, like, (gate,))
    g = _empty((NC, H, F, V), like, torch.float32)
    s0, _, pos = _state_args(m, state, like)
    cu_arg = cu if cu is not None else _dummy(like)
    lengths = (T, H, F, float(T), float(T), float(K), float(H))
    flags = dict(USE_S0=bool(state), VARLEN=cu is not None)
    none = _dummy(like)
    rot = _rope(m, state, T, K, BK, like)
    m.linear.chunked.dh[(NV, n * H)](
        qh, doh, none, none, 0, pos, cu_arg, co, g, none, dst, none, ds0, none, gate, *rot, *_params_f32(params),
        *_strides(qh, doh), *lengths, **meta, USE_DST=use_dst, **flags)
    # dL/dG_t ([B, H, T, K] per key dimension), the V blocks added atomically
    dbig = torch.zeros((B, H, T, K) if m.gate_dim else (B, H, T), dtype=torch.float32, device=like.device)
    dpar = _dpar(m, params, NV * NC * H, like)
    m.linear.chunked.dqkv[(NV, NC, H)](
        qh, kh, vh, doh, none, none, 0, dq_to, dk_to, dvh, h, hz, g, none, pos, cu_arg, ci, gate, *rot, dbig,
        *_params_f32(params), *dpar, *_strides(qh, kh, vh, doh, dq_to, dk_to, dvh), s_dqn, s_dkn, *lengths,
        groups, **meta, **flags)
    for buf, out in ((dq_buf, dqh), (dk_buf, dkh)):
        if buf is not None:
            out.copy_(buf.sum(0))
    dk, dv = _group_sum(dk, dkh, k, layout, groups), _group_sum(dv, dvh, v, layout, groups)
    ends = torch.full((n,), T, dtype=torch.int64, device=like.device) if cu is None else cu[1:].long()
    if m.gate_dim:  # T last, so that one code path serves both
        dbig = dbig.transpose(-1, -2)
    if use_dst:  # the final state reads every G up to the sequence's last token
        final = (dst.float() * s_t).sum(-1)  # [N, H, F]
        final = final if m.gate_dim else final.sum(-1)
        rows = torch.arange(n, device=like.device) if cu is None else torch.zeros(n, dtype=torch.long,
                                                                                      device=like.device)
        dbig[rows, ..., ends - 1] += final
    rev = dbig.flip(-1).cumsum(-1).flip(-1)  # sum over t >= s
    if cu is not None:  # within each packed sequence: subtract what the later sequences added
        nxt = torch.cat([rev, torch.zeros_like(rev[..., :1])], -1)
        seq = torch.searchsorted(cu[1:].long(), torch.arange(T, device=like.device), right=True)
        rev = rev - nxt[..., ends[seq]]
    if m.gate_dim:
        rev = rev.transpose(-1, -2)
    dparams = [_dpar_total(r, p, d, H, K) for r, d, p in zip(m.params, dpar, params)]
    # the gate's gradient contiguous, as the fake kernel declares it (a per-key-dimension gate's is a transpose)
    return [dq, dk, dv, *dparams, rev.to(gate.dtype).contiguous(), *([ds0] if state else [])]


# ---------------------------------------------------------------------------------------------
# the linear ordering's custom ops (opaque to torch.compile) with fake kernels and an autograd formula
# ---------------------------------------------------------------------------------------------
def _fwd_fake(m: Module, q, k, v, params, layout, state, cu, return_state):
    (B, H, T, K), V = _bhtd(q, layout).shape, v.shape[3]
    o = q.new_empty((B, T, H, V) if layout == "bthd" else (B, H, T, V))
    dtype = state[0].dtype if state else torch.float32
    # four outputs, four tensors: outputs that alias each other would not match the real kernel's (opcheck)
    st, zt = q.new_empty((0,), dtype=dtype), q.new_empty((0,), dtype=dtype)
    if return_state:
        n, f = _sequences(B, cu), m.feature_width(K)
        st = q.new_empty((n, H, f, V), dtype=dtype)
        zt = q.new_empty((n, H, f) if m.normalised else (0,), dtype=dtype)
    return o, q.new_empty((B, H, T) if m.normalised else (0,), dtype=torch.float32), st, zt


def _bwd_fake(do, q, k, v, o, den, params, layout, state, cu, dst, dzt):
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            *[torch.empty_like(p) for p in params], *[torch.empty_like(s) for s in state[:-1]]]


def _setup_context(ctx, inputs, output):
    q, k, v, params, layout, state, cu, return_state = inputs
    o, den, _, _ = output
    ctx.save_for_backward(q, k, v, o, den, *params, *state, *([] if cu is None else [cu]))
    ctx.layout, ctx.counts, ctx.return_state = layout, (len(params), len(state), cu is not None), return_state


def _backward(m: Module, ctx, do, dden, dst, dzt):
    q, k, v, o, den, *rest = ctx.saved_tensors
    n_params, n_state, has_cu = ctx.counts
    params, state = rest[:n_params], rest[n_params:n_params + n_state]
    cu = rest[-1] if has_cu else None
    do = torch.zeros_like(o) if do is None else do
    if not ctx.return_state or dst is None:
        dst = dzt = None
    elif m.normalised and dzt is None:
        dzt = torch.zeros(dst.shape[:-1], dtype=dst.dtype, device=dst.device)
    grads = _OPS[m.op_name + "_bwd"](do, q, k, v, o, den, list(params), ctx.layout, list(state), cu, dst, dzt)
    dq, dk, dv = grads[:3]
    dparams, dstate = grads[3:3 + n_params], grads[3 + n_params:]
    return dq, dk, dv, list(dparams), None, ([*dstate, None] if n_state else []), None, None


def _linear_ops(m: Module):
    """The linear ordering's two custom ops of ``m`` (reused when the process already has them)."""
    ns, name = torch.ops.attngen, m.op_name
    if hasattr(ns, name + "_fwd"):
        return getattr(ns, name + "_fwd"), getattr(ns, name + "_bwd")

    @torch.library.custom_op("attngen::" + name + "_fwd", mutates_args=())
    def fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: list[torch.Tensor], layout: str,
               state: list[torch.Tensor], cu: Optional[torch.Tensor],
               return_state: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _fwd(m, q, k, v, params, layout, state, cu, return_state)

    @torch.library.custom_op("attngen::" + name + "_bwd", mutates_args=())
    def bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               den: torch.Tensor, params: list[torch.Tensor], layout: str, state: list[torch.Tensor],
               cu: Optional[torch.Tensor], dst: Optional[torch.Tensor],
               dzt: Optional[torch.Tensor]) -> list[torch.Tensor]:
        return _bwd(m, do, q, k, v, o, den, params, layout, state, cu, dst, dzt)

    @fwd_op.register_fake
    def _(q, k, v, params, layout, state, cu, return_state):
        return _fwd_fake(m, q, k, v, params, layout, state, cu, return_state)

    def backward(ctx, do, dden, dst, dzt):
        return _backward(m, ctx, do, dden, dst, dzt)

    bwd_op.register_fake(_bwd_fake)
    fwd_op.register_autograd(backward, setup_context=_setup_context)
    return fwd_op, bwd_op


# ---------------------------------------------------------------------------------------------
# the quadratic ordering: launch drivers, block-sparse tables, custom ops
# ---------------------------------------------------------------------------------------------
def _qblocks(t, s, dk, dv, block, fp32_operands=False):
    """BM, BN, BK, BV and the launch options of the quadratic kernels: a tile of BM query rows and BN keys (both
    ``block`` in the block-sparse mode). 8 warps for tiles of 128 x 128 or head dims of 128 and more (the score
    tile and the [BM, BK] / [BN, BV] accumulators stay in registers), and 2 pipeline stages (not 3) for
    128 x 128 tiles at those head dims, which fits sm_80's 163 KB of shared memory. ``fp32_operands`` (a module
    with feature maps computed in the kernels, Module.fp32_features): half the tile from head dim 128 on (its dq
    kernel needed 196608 B of shared memory on sm_80 at 64 x 64) and 8 warps."""
    bk, bv = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))
    if block:
        bm = bn = block
    else:
        top = QBLOCK if max(bk, bv) < 128 or max(bk, bv) == 128 and not fp32_operands else QBLOCK // 2
        bm, bn = min(top, max(16, triton.next_power_of_2(t))), min(top, max(16, triton.next_power_of_2(s)))
    wide, big = max(bk, bv) >= 128, bm * bn >= 128 * 128
    # fp32 operands hold twice the registers of half ones: 8 warps (at head dim 64 with 4 warps the forward
    # spilled 16 KB on sm_90)
    return bm, bn, bk, bv, dict(num_warps=8 if wide or big or fp32_operands else 4,
                                num_stages=2 if wide and big else 3)


def _qfwd(m: Module, q, k, v, params, layout, tab, block):
    """o [layout of q, Dv], the row statistic [B, H, T] fp32 (empty when none is saved) and, for fp16 / bf16
    inputs with a statistic, o in fp32 for the backward (else empty): its D_i = dO_i . O_i from a rounded O
    would shift every ds_ij of row i and, summed with weights such as |i - j|, the parameters' gradients.
    ``tab``: the block-sparse mode's key blocks per query block [B, H, NQB, MAXB] int32 (None: dense)."""
    qh, kh, vh = (_bhtd(x, layout) for x in (q, k, v))
    B, H, T, K = qh.shape
    S, V = kh.shape[2], vh.shape[3]
    wide = m.qstat and q.dtype != torch.float32
    o, oh = _like_layout(B, H, T, V, q, layout, torch.float32 if wide else None)
    stat = _empty((B, H, T) if m.qstat else (0,), q, torch.float32)
    BM, BN, BK, BV, opts = _qblocks(T, S, K, V, block, m.fp32_features)
    lengths = (T, S, H, H // kh.shape[1], float(T), float(S), float(K), float(H))
    gc = ()
    if m.gate is not None:  # the score gains G_i - G_j: G the cumulative sum of the gate (params[-1])
        gc, params = (params[-1].cumsum(-1).contiguous(),), params[:-1]
    gc += _rotary_tables(m, max(T, S), K, BK, q)
    if m.quadratic.flash:
        sparse = tab is not None
        tab = tab if sparse else torch.zeros(1, dtype=torch.int32, device=q.device)
        extra = (tab, *gc, *_params_f32(params), *_strides(qh, kh, vh, oh), *lengths,
                 tab.shape[-1] if sparse else 0)
        flags = dict(SPARSE=sparse)
    else:
        extra = (*gc, *_params_f32(params), *_strides(qh, kh, vh, oh), *lengths)
        flags = {}
    m.quadratic.fwd[(triton.cdiv(T, BM), B * H)](
        qh, kh, vh, oh, stat, *extra, K=K, V=V, BM=BM, BN=BN, BK=BK, BV=BV, PREC=_precision(q, m), **opts, **flags)
    if wide:
        return o.to(q.dtype), stat, o
    return o, stat, _empty((0,), q, torch.float32)


def _qbwd(m: Module, do, q, k, v, o, stat, params, layout, tab, block, dstat=None):
    """[dq, dk, dv, d<param>...] for the gradient ``do`` of the output ``o`` (fp32 for half inputs, see _qfwd) and
    ``dstat`` of the saved log-sum-exp (flash modules; None: not used), which enters as D_i - dlse_i.
    Parameter gradients: each key-block program writes its partial sum, added here (deterministic, no atomics); a
    table parameter's gradient is scattered by bucket with fp32 atomic adds into a zeroed [B, H, NB] buffer
    (summed over the batch here, and over the heads for a shared table)."""
    qh, kh, vh, doh, oh = (_bhtd(x, layout) for x in (q, k, v, do, o))
    B, H, T, K = qh.shape
    S, V = kh.shape[2], vh.shape[3]
    BM, BN, BK, BV, opts = _qblocks(T, S, K, V, block, m.fp32_features)
    NKB = triton.cdiv(S, BN)
    gq = gk = ()
    if m.gate is not None:  # dL/dG_i = sum_j dS_ij - sum_j dS_ji: row sums (dq programs), column sums (dkv ones)
        gate, params = params[-1], params[:-1]
        gc = gate.cumsum(-1).contiguous()
        dgr, dgc = _empty((B, H, T), q, torch.float32), _empty((B, H, T), q, torch.float32)
        gq, gk = (gc, dgr), (gc, dgc)
    tables = _rotary_tables(m, max(T, S), K, BK, q)
    gq, gk = gq + tables, gk + tables
    groups = H // kh.shape[1]
    if m.qstat:
        delta = (doh.float() * oh.float()).sum(-1)  # [B, H, T]: D_i = sum_e dO_ie O_ie
        if dstat is not None and m.quadratic.flash:  # d lse_i / d s_ij = p_ij: ds_ij = p_ij (dP_ij - (D_i - dlse_i))
            delta = delta - dstat.float()
        delta = delta.contiguous()
    else:
        delta = _empty((0,), q, torch.float32)
    dq, dqh = _like_layout(B, H, T, K, q, layout)
    if groups > 1:  # grouped KV heads: dk, dv per query head (fp32), summed over each group below
        dkh, dvh = (_empty((B, H, S, d), q, torch.float32) for d in (K, V))
    else:
        dk, dkh = _like_layout(B, H, S, K, k, layout)
        dv, dvh = _like_layout(B, H, S, V, v, layout)
    records = m.params[:len(params)]
    dpar = [torch.zeros((B * H * r.buckets,), dtype=torch.float32, device=q.device) if r.buckets else
            _empty((B * H * NKB * (K if r.vector else 1),), q, torch.float32) for r in records]
    NQB = triton.cdiv(T, BM)  # the dq programs' partial sums (the q side's element maps): none for a table
    dparq = [_dummy(q) if r.buckets else _empty((B * H * NQB * (K if r.vector else 1),), q, torch.float32)
             for r in records]
    pf = _params_f32(params)
    lengths = (T, S, H, groups, float(T), float(S), float(K), float(H))
    meta = dict(K=K, V=V, BM=BM, BN=BN, BK=BK, BV=BV, PREC=_precision(q, m), **opts)
    if m.quadratic.flash:
        sparse = tab is not None
        rows = tab if sparse else torch.zeros(1, dtype=torch.int32, device=q.device)
        cols = _key_table(tab, NKB) if sparse else rows
        meta.update(SPARSE=sparse)
        m.quadratic.bwd_dq[(triton.cdiv(T, BM), B * H)](
            qh, kh, vh, doh, stat, delta, dqh, rows, *gq, *pf, *dparq, *_strides(qh, kh, vh, doh, dqh), *lengths,
            rows.shape[-1] if sparse else 0, **meta)
        m.quadratic.bwd_dkv[(NKB, B * H)](
            qh, kh, vh, doh, stat, delta, dkh, dvh, cols, *gk, *pf, *dpar, *_strides(qh, kh, vh, doh, dkh, dvh),
            *lengths, cols.shape[-1] if sparse else 0, **meta)
    else:
        m.quadratic.bwd_dq[(triton.cdiv(T, BM), B * H)](
            qh, kh, vh, doh, stat, delta, dqh, *gq, *pf, *dparq, *_strides(qh, kh, vh, doh, dqh), *lengths, **meta)
        m.quadratic.bwd_dkv[(NKB, B * H)](
            qh, kh, vh, doh, stat, delta, dkh, dvh, *gk, *pf, *dpar, *_strides(qh, kh, vh, doh, dkh, dvh), *lengths,
            **meta)
    dparams = []
    for r, p, part, partq in zip(records, params, dpar, dparq):
        if r.buckets:
            total = part.view(B, H, r.buckets).sum(0)  # [H, NB]
            dparams.append((total if r.per_head else total.sum(0)).to(p.dtype))
            continue
        width = (K,) if r.vector else ()
        total = part.view(B, H, NKB, *width).sum((0, 2)) + partq.view(B, H, NQB, *width).sum((0, 2))  # [H(, K)]
        dparams.append((total if r.per_head else total.sum(0)).to(p.dtype))
    if m.gate is not None:  # dg_s = sum_(t >= s) dL/dG_t (docs/derivations.md section 9)
        dparams.append((dgr - dgc).flip(-1).cumsum(-1).flip(-1).to(gate.dtype))
    if groups > 1:
        hk = kh.shape[1]
        dk, dkv = _like_layout(B, hk, S, K, k, layout)
        dv, dvv = _like_layout(B, hk, S, V, v, layout)
        dkv.copy_(dkh.view(B, hk, groups, S, K).sum(2))
        dvv.copy_(dvh.view(B, hk, groups, S, V).sum(2))
    return [dq, dk, dv, *dparams]


_ROTARY_TABLES: dict = {}  # (theta, K, device) -> (rows, cos, sin): kept and grown by powers of two


def _rotary_tables(m: Module, n: int, K: int, BK: int, like):
    """(cos, sin) [rows >= n, K/2] fp32 of the angles p * theta**(-2m/K) formed in float64, for the kernels' RoPE
    (empty without rotary positions). Built once per theta, head dim and device and regrown to the next power of two
    when a call reaches past it, so decode steps do not rebuild them. The kernels split a row's halves in
    registers: K must be the block width (a power of two >= 16)."""
    if m.rotary is None:
        return ()
    if K != BK:
        raise InputError(f"{m.spec}: rotary positions in the Triton kernels need a head dim that is a power of two "
                         f">= 16 (found {K}); use backend='torch'")
    key = (m.rotary, K, like.device)
    rows, cos, sin = _ROTARY_TABLES.get(key, (0, None, None))
    if n > rows:
        rows = triton.next_power_of_2(max(n, 64))
        freq = m.rotary ** (-2.0 * torch.arange(K // 2, dtype=torch.float64, device=like.device) / K)
        angle = torch.arange(rows, dtype=torch.float64, device=like.device)[:, None] * freq
        cos, sin = torch.cos(angle).float().contiguous(), torch.sin(angle).float().contiguous()
        _ROTARY_TABLES[key] = rows, cos, sin
    return cos, sin


def _key_table(tab, nkb):
    """The transposed block table: for each key block, the query blocks that list it, [B, H, NKB, MAXQ]
    int32 in ascending order, padded with -1 (torch ops, no loop over blocks)."""
    B, H, NQB, _ = tab.shape
    hit = torch.zeros(B, H, NQB, nkb + 1, dtype=torch.bool, device=tab.device)  # column nkb takes the -1s
    hit.scatter_(3, torch.where(tab >= 0, tab, nkb).long(), True)
    hit = hit[..., :nkb].transpose(2, 3)  # [B, H, NKB, NQB]
    width = max(1, int(hit.sum(-1).max())) if hit.numel() else 1
    rows = torch.arange(NQB, dtype=torch.int32, device=tab.device).expand_as(hit)
    order = torch.where(hit, rows, NQB).sort(-1).values[..., :width]
    return torch.where(order < NQB, order, -1).to(torch.int32).contiguous()


def _qfwd_fake(m: Module, q, k, v, params, layout, tab, block):
    (B, H, T, _), V = _bhtd(q, layout).shape, v.shape[3]
    shape = (B, T, H, V) if layout == "bthd" else (B, H, T, V)
    wide = m.qstat and q.dtype != torch.float32
    return (q.new_empty(shape), q.new_empty((B, H, T) if m.qstat else (0,), dtype=torch.float32),
            q.new_empty(shape if wide else (0,), dtype=torch.float32))


def _qbwd_fake(do, q, k, v, o, stat, params, layout, tab, block, dstat=None):
    return [torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), *[torch.empty_like(p) for p in params]]


def _qsetup_context(ctx, inputs, output):
    q, k, v, params, layout, tab, block = inputs
    o, stat, wide = output
    ctx.save_for_backward(q, k, v, wide if wide.numel() else o, stat, *params, *([] if tab is None else [tab]))
    ctx.layout, ctx.n_params, ctx.sparse, ctx.block = layout, len(params), tab is not None, block


def _qbackward(m: Module, ctx, do, dstat, dwide):
    q, k, v, o, stat, *rest = ctx.saved_tensors
    params = rest[:ctx.n_params]
    tab = rest[ctx.n_params] if ctx.sparse else None
    do = torch.zeros(o.shape, dtype=q.dtype, device=q.device) if do is None else do
    if dwide is not None and dwide.numel():
        do = (do.float() + dwide.float()).to(q.dtype)
    # the fp32 copy of o and the log-sum-exp: attention_lse hands them out (unused: None or zeros)
    dstat = dstat if m.quadratic.flash and dstat is not None and dstat.numel() else None
    grads = _OPS[m.op_name + "_qbwd"](do, q, k, v, o, stat, list(params), ctx.layout, tab, ctx.block, dstat)
    return grads[0], grads[1], grads[2], list(grads[3:]), None, None, None


def _quadratic_ops(m: Module):
    """The quadratic ordering's two custom ops of ``m``; ``tab`` None is the dense mode."""
    ns, name = torch.ops.attngen, m.op_name
    if hasattr(ns, name + "_qfwd"):
        return getattr(ns, name + "_qfwd"), getattr(ns, name + "_qbwd")

    @torch.library.custom_op("attngen::" + name + "_qfwd", mutates_args=())
    def qfwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: list[torch.Tensor], layout: str,
                tab: Optional[torch.Tensor], block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _qfwd(m, q, k, v, params, layout, tab, block)

    @torch.library.custom_op("attngen::" + name + "_qbwd", mutates_args=())
    def qbwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                stat: torch.Tensor, params: list[torch.Tensor], layout: str, tab: Optional[torch.Tensor],
                block: int, dstat: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        return _qbwd(m, do, q, k, v, o, stat, params, layout, tab, block, dstat)

    @qfwd_op.register_fake
    def _(q, k, v, params, layout, tab, block):
        return _qfwd_fake(m, q, k, v, params, layout, tab, block)

    def backward(ctx, do, dstat, dwide):
        return _qbackward(m, ctx, do, dstat, dwide)

    qbwd_op.register_fake(_qbwd_fake)
    qfwd_op.register_autograd(backward, setup_context=_qsetup_context)
    return qfwd_op, qbwd_op
