"""The ops are registered the way PyTorch's tooling needs: CPU kernels behind the dispatcher, schemas,
autograd and fake kernels that pass torch.library.opcheck, and graphs that torch.compile captures
whole. Without a kernel, mmv.ops falls back to the reference with a warning."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers.op_inputs import (
    TOLERANCES,
    assert_matches,
    cu_seqlens_of,
    generator_from,
    make_token_head_tensors,
    random_coords,
)

import mmv.ops._kernels
from mmv.ops import has_kernel, packed_attention, reference, rope3d, rope_freqs

OPS = ("rope3d", "packed_attention_fwd", "packed_attention_bwd")


@pytest.mark.parametrize("op_name", OPS)
def test_every_op_has_a_cpu_kernel(op_name):
    assert has_kernel(op_name, "cpu")


def rope3d_samples():
    """(args, kwargs) of rope3d calls covering dtypes, strided views, both pairings and no tokens."""
    generator = generator_from(10)
    samples = []
    for dtype, layout, interleaved, num_tokens in [
        (torch.float32, "contiguous", False, 9),
        (torch.bfloat16, "qkv", True, 9),
        (torch.float16, "head_major", False, 9),
        (torch.float64, "padded_rows", True, 9),
        (torch.float32, "contiguous", False, 0),
    ]:
        (x,) = make_token_head_tensors(1, num_tokens, 2, 16, dtype, layout, generator, requires_grad=True)
        coords = random_coords(num_tokens, generator)
        samples.append(((x, coords, rope_freqs(16, (3, 2, 2)), [3, 2, 2], interleaved), {}))
    return samples


def attention_samples(requires_grad: bool):
    """(q, k, v, cu_seqlens, max_seqlen, scale) of calls covering dtypes, views and empty sequences."""
    generator = generator_from(11)
    samples = []
    for dtype, layout, lengths, head_dim in [
        (torch.float32, "contiguous", [5, 0, 9], 16),
        (torch.bfloat16, "qkv", [1, 12], 64),
        (torch.float16, "head_major", [7], 5),
        (torch.float64, "padded_rows", [3, 4], 8),
        (torch.float32, "contiguous", [0, 0], 16),
    ]:
        q, k, v = make_token_head_tensors(
            3, sum(lengths), 2, head_dim, dtype, layout, generator, requires_grad=requires_grad
        )
        samples.append((q, k, v, cu_seqlens_of(lengths), max(lengths), head_dim**-0.5))
    return samples


@pytest.mark.parametrize("args, kwargs", rope3d_samples())
def test_opcheck_rope3d(args, kwargs):
    torch.library.opcheck(torch.ops.mmv.rope3d.default, args, kwargs)


@pytest.mark.parametrize("args", attention_samples(requires_grad=True))
def test_opcheck_packed_attention_fwd(args):
    torch.library.opcheck(torch.ops.mmv.packed_attention_fwd.default, args)


@pytest.mark.parametrize("args", attention_samples(requires_grad=False))
def test_opcheck_packed_attention_bwd(args):
    q, k, v, cu_seqlens, max_seqlen, scale = args
    out, lse = torch.ops.mmv.packed_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale)
    dout = torch.randn(q.shape, generator=generator_from(12)).to(q.dtype)
    torch.library.opcheck(
        torch.ops.mmv.packed_attention_bwd.default, (dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale)
    )


SECTIONS = (6, 5, 5)


def attention_layer(qkv, coords, freqs, cu_seqlens, max_seqlen: int):
    """The encoder's use of both ops on one packed (T, 3, H, D) projection."""
    q, k, v = qkv.unbind(1)
    q = rope3d(q, coords, freqs, SECTIONS)
    k = rope3d(k, coords, freqs, SECTIONS)
    return packed_attention(q, k, v, cu_seqlens, max_seqlen)


def layer_inputs(lengths: list[int], seed: int):
    generator = generator_from(seed)
    qkv = torch.randn(sum(lengths), 3, 2, 32, generator=generator, requires_grad=True)
    return qkv, random_coords(sum(lengths), generator), rope_freqs(32, SECTIONS), cu_seqlens_of(lengths), max(lengths)


def assert_compiled_matches_eager(backend: str) -> None:
    compiled = torch.compile(attention_layer, backend=backend, fullgraph=True)
    # Two batches of different sizes: the second is traced with symbolic shapes.
    for seed, lengths in enumerate([[17, 0, 40], [5, 64, 1, 9]]):
        qkv, *rest = layer_inputs(lengths, seed)
        grad_out = torch.randn(sum(lengths), 2, 32, generator=generator_from(seed))
        eager_out = attention_layer(qkv, *rest)
        (eager_grad,) = torch.autograd.grad(eager_out, qkv, grad_out)
        compiled_out = compiled(qkv, *rest)
        (compiled_grad,) = torch.autograd.grad(compiled_out, qkv, grad_out)
        tolerance = TOLERANCES[torch.float32]
        assert_matches(compiled_out, eager_out, tolerance.forward, f"{backend} output")
        assert_matches(compiled_grad, eager_grad, tolerance.backward, f"{backend} qkv gradient")


def test_compile_fullgraph_matches_eager():
    # aot_eager runs Dynamo, the fake kernels and AOT autograd, all that the registration decides.
    torch._dynamo.reset()
    assert_compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_with_inductor_matches_eager():
    # Inductor also chooses the memory layouts handed to the ops; its first C++ build takes ~40 s.
    torch._dynamo.reset()
    assert_compiled_matches_eager("inductor")


@pytest.fixture
def without_kernels(monkeypatch):
    """mmv.ops as on a device without mmv kernels, with the warn-once memory cleared."""
    for module in ("mmv.ops.rope3d", "mmv.ops.packed_attention"):
        monkeypatch.setattr(importlib.import_module(module), "has_kernel", lambda op_name, device_type: False)
    mmv.ops._kernels.warn_fallback.cache_clear()
    yield
    mmv.ops._kernels.warn_fallback.cache_clear()


def test_rope3d_falls_back_to_the_reference_with_a_warning(without_kernels):
    generator = generator_from(13)
    (x,) = make_token_head_tensors(1, 7, 2, 16, torch.float32, "qkv", generator)
    coords, freqs = random_coords(7, generator), rope_freqs(16)
    with pytest.warns(RuntimeWarning, match="reference"):
        out = rope3d(x, coords, freqs, (3, 2, 2))
    assert torch.equal(out, reference.rope3d(x, coords, freqs, (3, 2, 2)))


def test_packed_attention_falls_back_to_the_reference_with_a_warning(without_kernels):
    q, k, v = make_token_head_tensors(3, 9, 2, 16, torch.float32, "qkv", generator_from(14))
    cu_seqlens = cu_seqlens_of([4, 0, 5])
    with pytest.warns(RuntimeWarning, match="reference"):
        out = packed_attention(q, k, v, cu_seqlens)
    assert torch.equal(out, reference.packed_attention(q, k, v, cu_seqlens))


def test_packed_attention_fallback_differentiates_a_batch_without_tokens(without_kernels):
    q, k, v = (torch.empty(0, 2, 16, requires_grad=True) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="reference"):
        out = packed_attention(q, k, v, cu_seqlens_of([0, 0]))
    grads = torch.autograd.grad(out, (q, k, v), torch.empty(0, 2, 16))
    assert [g.shape for g in grads] == [(0, 2, 16)] * 3
