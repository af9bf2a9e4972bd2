"""Block-diagonal ("packed") attention over variable-length sequences: the public op, its autograd
and its fake (meta) kernels."""

from __future__ import annotations

import numbers

import torch

from mmv.ops import reference
from mmv.ops._kernels import extension_loaded, has_kernel, warn_fallback
from mmv.ops.checks import check_cu_seqlens_values, check_packed_attention_args, check_token_head_tensor

__all__ = ["packed_attention"]


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    *,
    deterministic: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """Non-causal self-attention within each sequence of a packed batch.

    Args:
        q, k, v: ``(T, H, D)`` with one dtype (float32 / bfloat16 / float16; float64 for gradient
            checks), last dimension contiguous (views of a packed qkv tensor work), 1 <= D <= 256.
        cu_seqlens: int32 ``(B + 1,)`` on q's device: sequence b holds tokens
            ``cu_seqlens[b]:cu_seqlens[b + 1]``. Zero-length sequences are allowed.
        max_seqlen: an upper bound on every sequence length, or None to derive it. Under
            ``torch.compile`` it stays symbolic: another bound does not compile the caller again.
        scale: the softmax scale, default ``D ** -0.5``.
        deterministic: make the backward pass bit-reproducible whatever the run or the order of
            sequences (the CPU backward always is).
        validate: check the values of ``cu_seqlens`` on CUDA, where the check copies them to the host
            (a synchronisation). With False the CUDA kernels trust them: wrong values give wrong results,
            though every memory access stays in bounds; only skip it for a ``PackedBatch``, which was
            validated when it was built. The CPU kernel and the reference fallback schedule from the
            values and always check them, whatever ``validate`` says.

    Returns:
        ``(T, H, D)`` of q's dtype. No token attends to another sequence's tokens.
    """
    if scale is None:
        head_dim = q.shape[-1]
        scale = head_dim**-0.5 if head_dim > 0 else 1.0  # head_dim 0 is rejected by the op's checks
    scale = float(scale)
    if max_seqlen is None:
        max_seqlen = -1
    elif not isinstance(max_seqlen, (int, torch.SymInt)):  # a traced int stays symbolic under torch.compile
        if not isinstance(max_seqlen, numbers.Integral):
            raise TypeError(f"packed_attention: max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
        max_seqlen = int(max_seqlen)
    if has_kernel("packed_attention_fwd", q.device.type):
        out, _ = torch.ops.mmv.packed_attention_fwd(
            q, k, v, cu_seqlens, max_seqlen, scale, bool(validate), bool(deterministic)
        )
        return out
    warn_fallback("packed_attention", q.device.type)
    op = "packed_attention"
    check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen, scale, op)
    check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen, op)
    return reference.packed_attention(q, k, v, cu_seqlens, scale)


if extension_loaded():

    @torch.library.register_fake("mmv::packed_attention_fwd")
    def _packed_attention_fwd_fake(q, k, v, cu_seqlens, max_seqlen, scale, validate=True, deterministic=False):
        check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen, scale, "packed_attention_fwd")
        num_tokens, num_heads, head_dim = q.shape
        out = q.new_empty((num_tokens, num_heads, head_dim))
        lse = q.new_empty((num_heads, num_tokens), dtype=torch.float32)
        return out, lse

    @torch.library.register_fake("mmv::packed_attention_bwd")
    def _packed_attention_bwd_fake(
        dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, validate=True, deterministic=False
    ):
        op = "packed_attention_bwd"
        check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen, scale, op)
        check_token_head_tensor(dout, op, "dout")
        check_token_head_tensor(out, op, "out")
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen, scale, validate, deterministic = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.scale = scale
        ctx.validate = validate
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = torch.ops.mmv.packed_attention_bwd(
            grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.validate, ctx.deterministic
        )
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd("mmv::packed_attention_fwd", _backward, setup_context=_setup_context)
