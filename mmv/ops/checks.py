"""Metadata checks of op arguments in Python, mirroring csrc/checks.h.

They run where the compiled checks cannot: in the fake (meta) kernels that torch.compile traces, and
before the reference fallback. Values inside tensors (cu_seqlens) are only checked on real data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_token_head_tensor(t: torch.Tensor, op: str, name: str) -> None:
    if t.dim() != 3:
        raise ValueError(
            f"{op}: {name} must have shape (tokens, heads, head_dim), got {t.dim()} dimensions "
            f"with shape {tuple(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.numel() > 0 and t.shape[2] > 1 and t.stride(2) != 1:  # an empty tensor's strides are never used
        raise ValueError(
            f"{op}: {name} must be contiguous in its last dimension (head_dim), got strides "
            f"{tuple(t.stride())}"
        )


def _check_same_device(t: torch.Tensor, ref: torch.Tensor, op: str, name: str, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_rope3d_args(x, coords, freqs, sections: Sequence[int]) -> None:
    op = "rope3d"
    check_token_head_tensor(x, op, "x")
    head_dim = x.shape[2]
    if head_dim % 2:
        raise ValueError(f"{op}: x's head_dim must be even, got {head_dim}")
    num_pairs = head_dim // 2
    _check_same_device(coords, x, op, "coords", "x")
    if coords.dtype != torch.float32:
        raise TypeError(f"{op}: coords must be float32, got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[0] != x.shape[0] or coords.shape[1] != 3:
        raise ValueError(f"{op}: coords must have shape (tokens, 3) = ({x.shape[0]}, 3), got {tuple(coords.shape)}")
    _check_same_device(freqs, x, op, "freqs", "x")
    if freqs.dtype != torch.float32:
        raise TypeError(f"{op}: freqs must be float32, got {freqs.dtype}")
    if freqs.dim() != 1 or freqs.shape[0] != num_pairs:
        raise ValueError(f"{op}: freqs must have shape (head_dim / 2,) = ({num_pairs},), got {tuple(freqs.shape)}")
    check_sections(sections, num_pairs, op)


def check_sections(sections: Sequence[int], num_pairs: int, op: str = "rope3d") -> None:
    if len(sections) != 3:
        raise ValueError(f"{op}: sections must hold three pair counts (z, y, x), got {len(sections)} values")
    if any(int(s) < 0 for s in sections):
        raise ValueError(f"{op}: sections must be non-negative, got {list(sections)}")
    if sum(sections) > num_pairs:
        raise ValueError(
            f"{op}: sections {list(sections)} sum to {sum(sections)}, more than the {num_pairs} rotary pairs "
            f"of head_dim {2 * num_pairs}"
        )


def check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen: int, scale: float, op: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_token_head_tensor(t, op, name)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        _check_same_device(t, q, op, name, "q")
    head_dim = q.shape[2]
    if not 1 <= head_dim <= 256:
        raise ValueError(f"{op}: head_dim must be between 1 and 256, got {head_dim}")
    _check_same_device(cu_seqlens, q, op, "cu_seqlens", "q")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{op}: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens must have shape (batch + 1,), got {tuple(cu_seqlens.shape)}")
    if max_seqlen < -1:
        raise ValueError(
            f"{op}: max_seqlen must be a non-negative bound on every sequence length (or -1 for none), got {max_seqlen}"
        )
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, num_tokens: int, max_seqlen: int, op: str) -> None:
    """The values of cu_seqlens: start at 0, non-decreasing, end at num_tokens, lengths <= max_seqlen."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    for b in range(len(cu) - 1):
        length = cu[b + 1] - cu[b]
        if length < 0:
            raise ValueError(
                f"{op}: cu_seqlens must be non-decreasing, got cu_seqlens[{b}] = {cu[b]} > "
                f"cu_seqlens[{b + 1}] = {cu[b + 1]}"
            )
        if max_seqlen >= 0 and length > max_seqlen:
            raise ValueError(f"{op}: sequence {b} has length {length}, longer than max_seqlen = {max_seqlen}")
    if cu[-1] != num_tokens:
        raise ValueError(
            f"{op}: cu_seqlens must end at the number of tokens {num_tokens}, got cu_seqlens[{len(cu) - 1}] = {cu[-1]}"
        )
