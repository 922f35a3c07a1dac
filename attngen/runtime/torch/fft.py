"""The FFT ordering in PyTorch (docs/derivations.md section 7): a Toeplitz reweighting W = h(i - j) as a
convolution along the sequence, O_i = Q'_i . sum_j h(i - j) U_j with U_j = K'_j^T V_j.
"""
from __future__ import annotations

import torch

from attngen.passes.rewrite import T_DIFF
from attngen.runtime.evaluate import Evaluator
from attngen.runtime.torch.common import as_tensor


def fft_length(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def toeplitz(qf, kf, v, kernel, env: dict, causal: bool, where: str) -> torch.Tensor:
    """Unnormalised O [B, H, T, E] for Q' [B, H, T, F], K' [B, H, S, F], V [B, H, S, E].

    ``kernel`` is h(t) in T_DIFF (or its closure: attngen.runtime.evaluate.compiled). The circular convolution
    has length >= T + S - 1, so the lags t in [-(S-1), T-1] never wrap onto each other; causal keeps h on t >= 0
    only. Memory is T * F * E per head (the cost model weighs it against the quadratic plan)."""
    t, s = qf.shape[2], kf.shape[2]
    n = fft_length(t + s - 1)
    h_pos = _kernel_values(kernel, env, torch.arange(t), qf, where)  # lags 0 .. T-1
    gap = n - t - (s - 1)
    if causal or s == 1:
        h_circ = torch.nn.functional.pad(h_pos, (0, 0, 0, n - t))
    else:  # negative lags -(S-1) .. -1 sit at the end of the circle
        h_neg = _kernel_values(kernel, env, torch.arange(-(s - 1), 0), qf, where)
        h_circ = torch.cat([h_pos, h_pos.new_zeros(*h_pos.shape[:2], gap, 1), h_neg], 2)
    u = kf.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, S, F, E]
    u_hat = torch.fft.rfft(u, n=n, dim=2)
    h_hat = torch.fft.rfft(h_circ.unsqueeze(-1), n=n, dim=2)  # [1, H or 1, n/2+1, 1, 1]
    conv = torch.fft.irfft(u_hat * h_hat, n=n, dim=2)[:, :, :t]  # [B, H, T, F, E]
    return torch.einsum("bhtf,bhtfe->bhte", qf, conv)


def _kernel_values(kernel, env: dict, lags: torch.Tensor, like: torch.Tensor, where: str) -> torch.Tensor:
    """h at the given lags as [1, H or 1, len(lags), 1]."""
    lag = lags.to(dtype=like.dtype, device=like.device).view(1, 1, -1, 1)
    value = as_tensor(Evaluator({**env, T_DIFF: lag}, where=f"{where}: Toeplitz kernel").run(kernel), like)
    heads = value.shape[1] if value.dim() == 4 else 1
    return torch.broadcast_to(value, (1, heads, lag.shape[2], 1))
