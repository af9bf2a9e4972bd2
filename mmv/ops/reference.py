"""Plain PyTorch versions of mmv's ops.

These are the specification in code (docs/design.md, "Op: rope3d" and "Op: packed_attention") and the
fallback on devices that have no mmv kernel. They favour clarity over speed: attention here
materialises one L x L score matrix per sequence, which the kernels never do.
"""

from __future__ import annotations

import torch

__all__ = ["rope3d", "packed_attention", "packed_attention_fwd", "packed_attention_bwd"]


def _pair_axes(num_pairs: int, sections: tuple[int, int, int], device) -> torch.Tensor:
    """Axis index (0 = z, 1 = y, 2 = x) of every rotary pair; -1 for pairs left unrotated."""
    axis = torch.full((num_pairs,), -1, dtype=torch.long, device=device)
    start = 0
    for a, s in enumerate(sections):
        axis[start : start + s] = a
        start += s
    return axis


def rope3d(
    x: torch.Tensor,
    coords: torch.Tensor,
    freqs: torch.Tensor,
    sections,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (T, H, D) by angles ``coords[t, axis(j)] * freqs[j]``."""
    num_tokens, num_heads, head_dim = x.shape
    num_pairs = head_dim // 2
    axis = _pair_axes(num_pairs, tuple(sections), x.device)
    rotated = axis >= 0
    # Angles in float32, as the kernels compute them; unrotated pairs get angle 0.
    theta = coords.float()[:, axis.clamp(min=0)] * freqs.float()[None, :]
    theta = torch.where(rotated[None, :], theta, torch.zeros_like(theta))
    compute = x.double() if x.dtype == torch.float64 else x.float()
    theta = theta.to(compute.dtype)
    cos = theta.cos()[:, None, :]
    sin = theta.sin()[:, None, :]
    if interleaved:
        u, v = compute[..., 0::2], compute[..., 1::2]
    else:
        u, v = compute[..., :num_pairs], compute[..., num_pairs:]
    u_out = u * cos - v * sin
    v_out = v * cos + u * sin
    if interleaved:
        out = torch.stack((u_out, v_out), dim=-1).reshape(num_tokens, num_heads, head_dim)
    else:
        out = torch.cat((u_out, v_out), dim=-1)
    return out.to(x.dtype)


def _sequence_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def packed_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal attention over packed sequences; returns (out, lse) with lse of shape (H, T)."""
    num_tokens, num_heads, head_dim = q.shape
    if scale is None:
        scale = head_dim**-0.5
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outputs = []
    lse = torch.full((num_heads, num_tokens), float("-inf"), dtype=torch.float32, device=q.device)
    for start, end in _sequence_bounds(cu_seqlens):
        if end == start:
            continue
        qs = q[start:end].to(compute_dtype).transpose(0, 1)  # (H, L, D)
        ks = k[start:end].to(compute_dtype).transpose(0, 1)
        vs = v[start:end].to(compute_dtype).transpose(0, 1)
        scores = scale * qs @ ks.transpose(1, 2)  # (H, L, L)
        seq_lse = torch.logsumexp(scores, dim=-1)  # (H, L)
        probs = torch.exp(scores - seq_lse[..., None])
        outputs.append((probs @ vs).transpose(0, 1))
        lse[:, start:end] = seq_lse.float()
    # A batch without tokens still returns an output connected to q, k and v for autograd.
    out = torch.cat(outputs) if outputs else (q + k + v).to(compute_dtype) * 0
    return out.to(q.dtype), lse


def packed_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of ``packed_attention`` by autograd through the reference forward.

    ``out``, when given, is the forward's output as the kernels saved it (rounded to the op's dtype). Their
    backward reads it, as FlashAttention's does, for ``D_i = sum_d dout_id * out_id``, so its rounding is
    an input of the backward like that of q, k and v; given ``out``, D is taken from it here too. A shift
    ``delta_i`` of D changes the score gradient by ``-P_ij * delta_i``, which is the gradient of
    ``-sum_i delta_i * lse_i``.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        exact, lse = packed_attention_fwd(*leaves, cu_seqlens, scale)
        objective = (exact * dout.to(exact.dtype)).sum()
        if out is not None:
            shift = out.detach().to(exact.dtype) - exact.detach()
            # Where either is NaN or infinite there is no rounding to follow (inf - inf is NaN): those
            # rows' gradients are compared by where they are non-finite, not by value.
            shift = torch.where(shift.isfinite(), shift, torch.zeros_like(shift))
            delta = (shift * dout.to(exact.dtype)).sum(-1)  # (T, H)
            objective = objective - (delta.T * lse.to(exact.dtype)).sum()
        grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Differentiable reference attention (autograd goes through plain PyTorch ops)."""
    return packed_attention_fwd(q, k, v, cu_seqlens, scale)[0]
