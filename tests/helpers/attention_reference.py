"""packed_attention against the float64 reference of :mod:`mmv.ops.reference`, for the CPU and the CUDA tests."""

from __future__ import annotations

import torch
from helpers.op_inputs import TOLERANCES, assert_same_non_finite, cu_seqlens_of, generator_from

from mmv.ops import reference


def reference_float64(q, k, v, cu_seqlens, scale):
    """(out, lse) of the reference in float64, from the same (rounded) inputs as the op saw."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    return reference.packed_attention_fwd(q, k, v, cu_seqlens, scale)


def reference_gradients_float64(grad_out, q, k, v, cu_seqlens, scale=None, out=None):
    """(dq, dk, dv) of the reference in float64, with D taken from the op's own ``out`` when given (see
    :func:`mmv.ops.reference.packed_attention_bwd`); those of an empty batch are empty."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    return reference.packed_attention_bwd(grad_out.double(), q, k, v, cu_seqlens, scale, out)


def sequences_with_an_infinite_lse(lse: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(T, H, 1) boolean: the (sequence, head) of each token holds a token whose lse is +inf."""
    flags = []
    for start, length in zip(cu_seqlens_of(lengths).tolist(), lengths):
        any_inf = (lse[:, start : start + length] == float("inf")).any(dim=1)  # (H,)
        flags.append(any_inf.expand(length, -1))
    return torch.cat(flags)[..., None] if flags else torch.zeros(0, lse.shape[0], 1, dtype=torch.bool)


def check_non_finite_against_reference(q, k, v, lengths, scale, seed, deterministic=False):
    """packed_attention on q's device against the float64 reference, for inputs holding NaN or inf.

    A NaN or inf in q, k or v (a diverging run) must reach the output and gradients wherever it reaches
    the reference's: never dropped as if masked, never spread to other sequences or heads. Two documented
    differences: a row with a +inf score has lse NaN (torch.logsumexp: +inf), so every gradient of its
    sequence and head that the row touches is NaN; and an element that is infinite in the reference may be
    NaN in the kernel's, whose sums meet the infinities in another order (inf - inf).
    """
    device = q.device
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    cu_seqlens = cu_seqlens_of(lengths)
    grad_out = torch.randn(q.shape, generator=generator_from(seed)).to(q.dtype).to(device)
    scale_value = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = torch.ops.mmv.packed_attention_fwd(q, k, v, cu_seqlens.to(device), -1, scale_value, True, deterministic)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    cpu = [t.detach().cpu() for t in (q, k, v)]
    expected_out, expected_lse = reference_float64(*cpu, cu_seqlens, scale)
    # With the op's out: D from the rounded out, as the kernels take it (the reference leaves out the
    # elements where out or the exact output is not finite).
    expected_grads = reference_gradients_float64(grad_out.cpu(), *cpu, cu_seqlens, scale, out.detach().cpu())
    tolerance = TOLERANCES[q.dtype]
    assert_same_non_finite(out.cpu(), expected_out, tolerance.forward, "out")
    lse_may_be_nan = expected_lse == float("inf")
    assert_same_non_finite(lse.cpu(), expected_lse, TOLERANCES[torch.float32].forward, "lse", lse_may_be_nan)
    infinite_lse = sequences_with_an_infinite_lse(expected_lse, lengths)
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert grad.dtype == q.dtype
        assert_same_non_finite(grad.cpu(), expected, tolerance.backward, name, infinite_lse)
