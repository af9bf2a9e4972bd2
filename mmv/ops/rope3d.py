"""3D rotary position embedding: the public op, its autograd and its fake (meta) kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmv.ops import reference
from mmv.ops._kernels import extension_loaded, has_kernel, warn_fallback
from mmv.ops.checks import check_rope3d_args, check_sections

__all__ = ["rope3d", "rope_freqs", "default_sections"]


def rope3d(
    x: torch.Tensor,
    coords: torch.Tensor,
    freqs: torch.Tensor,
    sections: Sequence[int],
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotate the channel pairs of ``x`` by angles set by each token's (z, y, x) position.

    Args:
        x: ``(T, H, D)`` float32 / bfloat16 / float16 (float64 for gradient checks), D even, last
            dimension contiguous; strided views such as ``qkv[:, 0]`` of a ``(T, 3, H, D)`` tensor work
            without a copy.
        coords: float32 ``(T, 3)``, each token's (z, y, x) position.
        freqs: float32 ``(D / 2,)``, one frequency per pair (see :func:`rope_freqs`).
        sections: ``(s_z, s_y, s_x)`` pairs per axis; pairs beyond their sum pass through unchanged.
        interleaved: pair channels ``(2j, 2j + 1)`` instead of ``(j, j + D / 2)``.

    Returns:
        A new contiguous ``(T, H, D)`` tensor of ``x``'s dtype. Gradients flow to ``x`` only.
    """
    sections = [int(s) for s in sections]
    if any(not -(2**63) <= s < 2**63 for s in sections):
        # The op's schema takes int64; a larger count would fail in its argument parsing, unnamed.
        raise ValueError(f"rope3d: sections must be pair counts of at most the rotary pairs of x, got {sections}")
    interleaved = bool(interleaved)
    if has_kernel("rope3d", x.device.type):
        return torch.ops.mmv.rope3d(x, coords, freqs, sections, interleaved)
    warn_fallback("rope3d", x.device.type)
    check_rope3d_args(x, coords, freqs, sections)
    return reference.rope3d(x, coords, freqs, sections, interleaved)


def default_sections(head_dim: int) -> tuple[int, int, int]:
    """Split the ``head_dim / 2`` pairs over (z, y, x): y and x get P // 3 each, z the rest."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"default_sections: head_dim must be even and positive, got {head_dim}")
    num_pairs = head_dim // 2
    third = num_pairs // 3
    return (num_pairs - 2 * third, third, third)


def rope_freqs(
    head_dim: int,
    sections: Sequence[int] | None = None,
    base: float = 100.0,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Default frequencies: for an axis with ``s`` pairs, ``base ** (-k / s)`` for k = 0 .. s - 1.

    Pairs beyond ``sum(sections)`` get frequency 0. Returns float32 ``(head_dim / 2,)``.
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope_freqs: head_dim must be even and positive, got {head_dim}")
    if not base > 0:
        raise ValueError(f"rope_freqs: base must be positive, got {base}")
    num_pairs = head_dim // 2
    sections = default_sections(head_dim) if sections is None else tuple(int(s) for s in sections)
    check_sections(sections, num_pairs, "rope_freqs")
    parts = [base ** (-torch.arange(s, dtype=torch.float64) / s) for s in sections if s > 0]
    parts.append(torch.zeros(num_pairs - sum(sections), dtype=torch.float64))
    return torch.cat(parts).to(device=device, dtype=torch.float32)


if extension_loaded():

    @torch.library.register_fake("mmv::rope3d")
    def _rope3d_fake(x, coords, freqs, sections, interleaved=False):
        check_rope3d_args(x, coords, freqs, sections)
        return x.new_empty(x.shape)

    def _rope3d_setup_context(ctx, inputs, output):
        _, coords, freqs, sections, interleaved = inputs
        ctx.save_for_backward(coords, freqs)
        ctx.sections = sections
        ctx.interleaved = interleaved

    def _rope3d_backward(ctx, grad_out):
        # A rotation's adjoint is the rotation by the opposite angle.
        coords, freqs = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        grad_x = torch.ops.mmv.rope3d(grad_out, coords, -freqs, ctx.sections, ctx.interleaved)
        return grad_x, None, None, None, None

    torch.library.register_autograd("mmv::rope3d", _rope3d_backward, setup_context=_rope3d_setup_context)
