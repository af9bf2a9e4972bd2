"""packed_attention's compiled CPU kernels against the reference of mmv.ops.reference, and the
properties block-diagonal attention must have (docs/design.md, "Op: packed_attention")."""

from __future__ import annotations

import pytest
import torch
from helpers.attention_reference import (
    check_non_finite_against_reference,
    reference_float64,
    reference_gradients_float64,
)
from helpers.op_inputs import (
    LOW_AND_SINGLE_PRECISION,
    OP_SETTINGS,
    TOLERANCES,
    assert_matches,
    attention_problems,
    cu_seqlens_of,
    generator_from,
    make_token_head_tensors,
    non_finite_attention_problems,
    seeds,
)
from hypothesis import given
from hypothesis import strategies as st

from mmv.ops import has_kernel, packed_attention


def forward(q, k, v, cu_seqlens, max_seqlen=-1, scale=None):
    """The compiled forward op, with the default scale filled in as mmv.ops.packed_attention does."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.mmv.packed_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale)


@pytest.fixture(autouse=True, scope="module")
def compiled_kernels():
    # Without them mmv.ops.packed_attention would quietly test the reference against itself.
    for op_name in ("packed_attention_fwd", "packed_attention_bwd"):
        assert has_kernel(op_name, "cpu"), f"no CPU kernel for mmv::{op_name}"


@OP_SETTINGS
@given(problem=attention_problems())
def test_forward_matches_float64_reference(problem):
    q, k, v, lengths, scale = problem
    cu_seqlens = cu_seqlens_of(lengths)
    out, lse = forward(q, k, v, cu_seqlens, max(lengths), scale)
    expected_out, expected_lse = reference_float64(q, k, v, cu_seqlens, scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_matches(out, expected_out, TOLERANCES[q.dtype].forward, "out")
    # lse is float32 whatever q's dtype: it only carries the float32 summation's error.
    assert_matches(lse, expected_lse, TOLERANCES[torch.float32].forward, "lse")


@OP_SETTINGS
@given(problem=attention_problems(), seed=seeds)
def test_public_op_matches_float64_reference_with_gradients(problem, seed):
    q, k, v, lengths, scale = problem
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    cu_seqlens = cu_seqlens_of(lengths)
    grad_out = torch.randn(q.shape, generator=generator_from(seed)).to(q.dtype)
    out = packed_attention(q, k, v, cu_seqlens, scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    expected_out, _ = reference_float64(q, k, v, cu_seqlens, scale)
    expected_grads = reference_gradients_float64(grad_out, q, k, v, cu_seqlens, scale, out)
    tolerance = TOLERANCES[q.dtype]
    assert_matches(out, expected_out, tolerance.forward, "out")
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert grad.dtype == q.dtype
        assert_matches(grad, expected, tolerance.backward, name)


@OP_SETTINGS
@given(problem=non_finite_attention_problems(st.sampled_from([*LOW_AND_SINGLE_PRECISION, torch.float64])), seed=seeds)
def test_non_finite_inputs_propagate_as_in_the_reference(problem, seed):
    check_non_finite_against_reference(*problem, seed)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_poisons_what_it_touches_in_its_sequence_and_head(where):
    # The case the CPU kernel once got wrong: a NaN in k was dropped as if masked, one in q gave a finite row.
    q, k, v = make_token_head_tensors(3, 20, 2, 16, torch.float32, "contiguous", generator_from(7))
    {"q": q, "k": k, "v": v}[where][0, 0, 0] = float("nan")
    out, lse = forward(q, k, v, cu_seqlens_of([5, 15]))
    expected_out, expected_lse = torch.zeros(out.shape, dtype=torch.bool), torch.zeros(lse.shape, dtype=torch.bool)
    if where == "q":  # token 0's scores, and so its row
        expected_out[0, 0], expected_lse[0, 0] = True, True
    elif where == "k":  # every score of the first sequence's head 0
        expected_out[:5, 0], expected_lse[0, :5] = True, True
    else:  # channel 0 of the first sequence's head 0; the scores stay finite
        expected_out[:5, 0, 0] = True
    assert torch.equal(out.isnan(), expected_out)
    assert torch.equal(lse.isnan(), expected_lse)


@pytest.mark.parametrize(
    "lengths, head_dim",
    [([3, 0, 4], 3), ([1, 5], 4), ([6], 1)],
)
def test_gradcheck_float64(lengths, head_dim):
    generator = generator_from(5)
    q, k, v = (
        t.requires_grad_(True)
        for t in torch.randn(3, sum(lengths), 2, head_dim, dtype=torch.float64, generator=generator)
    )
    cu_seqlens = cu_seqlens_of(lengths)
    assert torch.autograd.gradcheck(lambda q, k, v: packed_attention(q, k, v, cu_seqlens), (q, k, v))


@OP_SETTINGS
@given(problem=attention_problems())
def test_lse_is_the_logsumexp_of_each_tokens_scores(problem):
    q, k, _, lengths, scale = problem
    _, lse = forward(q, k, k, cu_seqlens_of(lengths), scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    assert lse.shape == (q.shape[1], q.shape[0])
    start = 0
    for length in lengths:
        qs, ks = (t[start : start + length].double().transpose(0, 1) for t in (q, k))
        scores = scale * qs @ ks.transpose(1, 2)  # (H, L, L)
        expected = torch.logsumexp(scores, dim=-1)
        assert_matches(lse[:, start : start + length], expected, TOLERANCES[torch.float32].forward, "lse")
        start += length


@OP_SETTINGS
@given(problem=attention_problems())
def test_packing_equals_attention_on_each_sequence_alone(problem):
    q, k, v, lengths, scale = problem
    packed_out, packed_lse = forward(q, k, v, cu_seqlens_of(lengths), scale=scale)
    start = 0
    for length in lengths:
        window = slice(start, start + length)
        alone_out, alone_lse = forward(q[window], k[window], v[window], cu_seqlens_of([length]), scale=scale)
        assert_matches(packed_out[window], alone_out, TOLERANCES[q.dtype].forward, "out of one sequence")
        assert_matches(packed_lse[:, window], alone_lse, TOLERANCES[torch.float32].forward, "lse of one sequence")
        start += length


@OP_SETTINGS
@given(problem=attention_problems(), order_seed=seeds)
def test_reordering_sequences_reorders_the_output(problem, order_seed):
    q, k, v, lengths, scale = problem
    out, _ = forward(q, k, v, cu_seqlens_of(lengths), scale=scale)
    starts = cu_seqlens_of(lengths).tolist()
    order = torch.randperm(len(lengths), generator=generator_from(order_seed)).tolist()
    token_order = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in order] + [torch.arange(0)])
    reordered_out, _ = forward(
        q[token_order], k[token_order], v[token_order], cu_seqlens_of([lengths[b] for b in order]), scale=scale
    )
    assert_matches(reordered_out, out[token_order], TOLERANCES[q.dtype].forward, "reordered out")


@OP_SETTINGS
@given(problem=attention_problems(dtype_strategy=st.just(torch.float32)), seed=seeds)
def test_no_token_sees_another_sequence(problem, seed):
    # Changing every key and value outside the first non-empty sequence leaves its outputs alone.
    q, k, v, lengths, scale = problem
    first = next((i for i, length in enumerate(lengths) if length), None)
    if first is None:
        return
    start = sum(lengths[:first])
    window = slice(start, start + lengths[first])
    cu_seqlens = cu_seqlens_of(lengths)
    out, _ = forward(q, k, v, cu_seqlens, scale=scale)
    generator = generator_from(seed)
    k_other, v_other = (t.detach().clone() for t in (k, v))
    outside = torch.ones(q.shape[0], dtype=torch.bool)
    outside[window] = False
    k_other[outside] = torch.randn(k_other[outside].shape, generator=generator) * 10
    v_other[outside] = torch.randn(v_other[outside].shape, generator=generator) * 10
    changed_out, _ = forward(q, k_other, v_other, cu_seqlens, scale=scale)
    assert_matches(changed_out[window], out[window], TOLERANCES[torch.float32].forward, "out of one sequence")


@pytest.mark.parametrize("max_seqlen", [None, 300, 10_000])
def test_max_seqlen_is_only_a_bound(max_seqlen):
    generator = generator_from(6)
    lengths = [300, 0, 17, 1]
    q, k, v = make_token_head_tensors(3, sum(lengths), 2, 32, torch.float32, "contiguous", generator)
    cu_seqlens = cu_seqlens_of(lengths)
    out = packed_attention(q, k, v, cu_seqlens, max_seqlen=max_seqlen)
    expected, _ = reference_float64(q, k, v, cu_seqlens, None)
    assert_matches(out, expected, TOLERANCES[torch.float32].forward, "out")


@pytest.mark.parametrize("num_sequences", [0, 3])
def test_empty_batch_and_empty_sequences(num_sequences):
    q, k, v = torch.empty(3, 0, 2, 16)
    cu_seqlens = cu_seqlens_of([0] * num_sequences)
    out, lse = forward(q, k, v, cu_seqlens)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    q = q.requires_grad_(True)
    (grad_q,) = torch.autograd.grad(packed_attention(q, k, v, cu_seqlens), q, torch.empty(0, 2, 16))
    assert grad_q.shape == (0, 2, 16)


def test_a_single_token_attends_only_to_itself():
    generator = generator_from(7)
    q, k, v = make_token_head_tensors(3, 4, 2, 8, torch.float32, "contiguous", generator)
    out, lse = forward(q, k, v, cu_seqlens_of([1, 1, 1, 1]))
    assert torch.allclose(out, v, rtol=1e-6, atol=1e-6)
    expected_lse = (q * k).sum(-1).transpose(0, 1) * 8**-0.5
    assert torch.allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_deterministic_backward_is_bit_reproducible():
    generator = generator_from(8)
    lengths = [197] * 3 + [400]
    q, k, v = make_token_head_tensors(3, sum(lengths), 2, 64, torch.bfloat16, "qkv", generator, requires_grad=True)
    cu_seqlens = cu_seqlens_of(lengths)
    grad_out = torch.randn(q.shape, generator=generator).to(q.dtype)
    first, second = (
        torch.autograd.grad(packed_attention(q, k, v, cu_seqlens, deterministic=True), (q, k, v), grad_out)
        for _ in range(2)
    )
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION)
def test_mixed_xray_and_ct_batch(dtype):
    # Scaled-down standard workload: several X-ray-sized sequences, one CT-sized one, an empty one,
    # across the tile boundaries of any kernel; head_dim 64 as in the encoder.
    generator = generator_from(9)
    lengths = [197, 0, 1, 197, 520]
    q, k, v = make_token_head_tensors(3, sum(lengths), 2, 64, dtype, "qkv", generator, requires_grad=True)
    cu_seqlens = cu_seqlens_of(lengths)
    grad_out = torch.randn(q.shape, generator=generator).to(dtype)
    out = packed_attention(q, k, v, cu_seqlens, max_seqlen=520)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_out, _ = reference_float64(q, k, v, cu_seqlens, None)
    expected_grads = reference_gradients_float64(grad_out, q, k, v, cu_seqlens, out=out)
    assert_matches(out, expected_out, TOLERANCES[dtype].forward, "out")
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_matches(grad, expected, TOLERANCES[dtype].backward, name)
