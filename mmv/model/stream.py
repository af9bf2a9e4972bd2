"""The encoder's packed token stream: what goes in, and where its rows go.

:class:`PatchStream` is a :class:`~mmv.packing.PackedBatch` as the encoder computes with it. The encoder
opens every image's sequence with its prefix tokens (CLS, registers, :func:`prefix_layout`) and moves
whole streams of rows at once (:func:`permute_rows`); the arithmetic here is tensor-only and of static
shape, so it compiles with symbolic sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["PatchStream", "PrefixLayout", "prefix_layout", "inverse_permutation", "permute_rows"]


class PatchStream(NamedTuple):
    """The patch tokens of a :class:`~mmv.packing.PackedBatch`, as the encoder's forward pass takes them.

    Only tensors and plain numbers: the batch's per-image Python tuples (grid shapes, modalities) stay
    out, so that ``torch.compile`` has none to guard on and keeps the number of images and tokens
    symbolic instead of compiling again for every new count; ``max_seqlen`` is a ``SymInt`` in
    ``packed_attention``'s schema, so a new longest image does not compile again either.

    Attributes:
        patches_2d: float32 ``(N2, py * px)``, the 2D patches; ``rows_2d`` int64 ``(N2,)`` their stream rows.
        patches_3d: float32 ``(N3, pz * py * px)``, the 3D patches; ``rows_3d`` int64 ``(N3,)`` their rows.
        coords_mm: float32 ``(T, 3)``, each token's (z, y, x) position in mm.
        cu_seqlens: int32 ``(B + 1,)``: image b owns stream rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        max_seqlen: an upper bound on every image's token count.
        validate: whether ``packed_attention`` must check ``cu_seqlens`` (False for a validated batch).
        token_mask: bool ``(T,)`` or None: True where the mask token replaces a patch embedding.
    """

    patches_2d: torch.Tensor
    patches_3d: torch.Tensor
    rows_2d: torch.Tensor
    rows_3d: torch.Tensor
    coords_mm: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    validate: bool
    token_mask: torch.Tensor | None


class PrefixLayout(NamedTuple):
    """Where rows go once ``num_prefix`` tokens (CLS, registers) open every sequence.

    Attributes:
        cu_seqlens: int32 ``(B + 1,)`` of the longer sequences.
        max_seqlen: the longer sequences' length bound.
        patch_rows: int64 ``(T,)``: the new row of each patch token.
        prefix_rows: int64 ``(B, num_prefix)``: the rows of each sequence's prefix tokens.
        sequence_ids: int64 ``(T + B * num_prefix,)``: the sequence of every row of the new stream.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    patch_rows: torch.Tensor
    prefix_rows: torch.Tensor
    sequence_ids: torch.Tensor


def prefix_layout(cu_seqlens: torch.Tensor, num_tokens: int, max_seqlen: int, num_prefix: int) -> PrefixLayout:
    """The packed layout after prepending ``num_prefix`` tokens to each of the sequences of ``cu_seqlens``.

    ``num_tokens`` is the stream length (``cu_seqlens[-1]``, given as an int to avoid a host sync).
    Only tensor arithmetic of static shape, so it compiles; offsets that were valid stay valid.
    """
    device = cu_seqlens.device
    num_sequences = cu_seqlens.shape[0] - 1
    starts = cu_seqlens.long()
    new_starts = starts + torch.arange(num_sequences + 1, device=device) * num_prefix
    token_index = torch.arange(num_tokens, device=device)
    token_sequence = torch.searchsorted(starts[1:], token_index, right=True)
    patch_rows = token_index + (token_sequence + 1) * num_prefix
    prefix_rows = new_starts[:-1, None] + torch.arange(num_prefix, device=device)
    row_index = torch.arange(num_tokens + num_sequences * num_prefix, device=device)
    sequence_ids = torch.searchsorted(new_starts[1:], row_index, right=True)
    return PrefixLayout(new_starts.int(), int(max_seqlen) + num_prefix, patch_rows, prefix_rows, sequence_ids)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The permutation ``inverse`` with ``inverse[order[i]] = i`` (``order`` a permutation of 0..N-1)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(rows, order, inverse):
        return rows.index_select(0, order)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``rows[order]`` for a permutation ``order`` whose inverse is ``inverse``, differentiably.

    The gradient is gathered through ``inverse`` instead of scattered with accumulation, which on the
    CPU is several times slower for a stream of tokens.
    """
    return _PermuteRows.apply(rows, order, inverse)
