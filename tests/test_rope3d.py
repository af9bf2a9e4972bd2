"""rope3d's compiled CPU kernel against the reference of mmv.ops.reference, and the properties a
rotary embedding must have (docs/design.md, "Op: rope3d")."""

from __future__ import annotations

import pytest
import torch
from helpers.op_inputs import (
    LAYOUTS,
    LOW_AND_SINGLE_PRECISION,
    OP_SETTINGS,
    TOLERANCES,
    assert_matches,
    generator_from,
    make_token_head_tensors,
    random_coords,
    rope_head_dims,
    rope_problems,
    seeds,
)
from hypothesis import given
from hypothesis import strategies as st

from mmv.ops import has_kernel, reference, rope3d, rope_freqs


def reference_float64(x, coords, freqs, sections, interleaved):
    return reference.rope3d(x.detach().double(), coords, freqs, sections, interleaved)


def test_cpu_kernel_is_registered():
    assert has_kernel("rope3d", "cpu")


def rope3d_gradient(problem, seed):
    """A random output gradient for the problem, and the gradient rope3d gives x for it."""
    x, coords, freqs, sections, interleaved = problem
    x = x.detach().requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=generator_from(seed)).to(x.dtype)
    (grad_x,) = torch.autograd.grad(rope3d(x, coords, freqs, sections, interleaved), x, grad_out)
    return grad_out, grad_x


@OP_SETTINGS
@given(problem=rope_problems())
def test_forward_matches_float64_reference(problem):
    x, coords, freqs, sections, interleaved = problem
    out = rope3d(x, coords, freqs, sections, interleaved)
    assert out.dtype == x.dtype and out.is_contiguous()
    expected = reference_float64(x, coords, freqs, sections, interleaved)
    assert_matches(out, expected, TOLERANCES[x.dtype].forward, "rope3d output")


@OP_SETTINGS
@given(problem=rope_problems(), seed=seeds)
def test_gradient_matches_float64_reference(problem, seed):
    x, coords, freqs, sections, interleaved = problem
    grad_out, grad_x = rope3d_gradient(problem, seed)

    x64 = x.detach().double().requires_grad_(True)
    out64 = reference.rope3d(x64, coords, freqs, sections, interleaved)
    (expected,) = torch.autograd.grad(out64, x64, grad_out.double())
    assert grad_x.dtype == x.dtype
    assert_matches(grad_x, expected, TOLERANCES[x.dtype].backward, "rope3d grad_x")


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("sections", [(3, 2, 1), (1, 0, 2)])
def test_gradcheck_float64(sections, interleaved):
    generator = generator_from(0)
    x = torch.randn(5, 2, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    coords = random_coords(5, generator)
    freqs = rope_freqs(12, sections)
    assert torch.autograd.gradcheck(lambda x: rope3d(x, coords, freqs, sections, interleaved), (x,))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION)
def test_views_of_packed_qkv_need_no_copy_and_stay_untouched(layout, dtype):
    generator = generator_from(1)
    q, k, v = make_token_head_tensors(3, 40, 3, 64, dtype, layout, generator)
    before = [t.clone() for t in (q, k, v)]
    coords = random_coords(40, generator)
    freqs = rope_freqs(64)
    sections = (12, 10, 10)
    for view in (q, k):
        out = rope3d(view, coords, freqs, sections)
        expected = reference_float64(view, coords, freqs, sections, False)
        assert_matches(out, expected, TOLERANCES[dtype].forward, f"rope3d of a {layout} view")
    for original, tensor in zip(before, (q, k, v)):
        assert torch.equal(original, tensor)


@OP_SETTINGS
@given(problem=rope_problems(st.just(torch.float32)))
def test_preserves_the_norm_of_every_pair_and_leaves_unrotated_pairs_alone(problem):
    x, coords, freqs, sections, interleaved = problem
    out = rope3d(x, coords, freqs, sections, interleaved)
    num_pairs = x.shape[-1] // 2

    def pairs(t):  # (T, H, P, 2)
        t = t.double()
        if interleaved:
            return t.unflatten(-1, (num_pairs, 2))
        return torch.stack((t[..., :num_pairs], t[..., num_pairs:]), dim=-1)

    pair_norms = pairs(x).norm(dim=-1)
    assert_matches(pairs(out).norm(dim=-1), pair_norms, TOLERANCES[torch.float32].forward, "pair norms")
    rotated = sum(sections)
    assert torch.equal(pairs(out)[:, :, rotated:], pairs(x)[:, :, rotated:])


@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION)
def test_tokens_at_the_origin_are_unchanged(dtype):
    # Prefix tokens (CLS, registers) sit at (0, 0, 0): a zero angle must leave them bit for bit.
    (x,) = make_token_head_tensors(1, 6, 2, 32, dtype, "contiguous", generator_from(2))
    out = rope3d(x, torch.zeros(6, 3), rope_freqs(32), (6, 5, 5))
    assert torch.equal(out, x)


@OP_SETTINGS
@given(
    seed=seeds,
    head_dim=rope_head_dims,
    interleaved=st.booleans(),
    positions=st.lists(st.integers(-300, 300), min_size=9, max_size=9),
)
def test_inner_product_depends_only_on_relative_position(seed, head_dim, interleaved, positions):
    # Integer positions and power-of-two frequencies make every float32 angle exact, so the property
    # holds to float64 rounding.
    num_pairs = head_dim // 2
    sections = (num_pairs - 2 * (num_pairs // 3), num_pairs // 3, num_pairs // 3)
    freqs = torch.tensor([2.0 ** -(j % 7) for j in range(num_pairs)], dtype=torch.float32)
    generator = generator_from(seed)
    q, k = torch.randn(2, 1, 1, head_dim, dtype=torch.float64, generator=generator)
    p, r, shift = (torch.tensor(positions[i : i + 3], dtype=torch.float32)[None] for i in (0, 3, 6))

    def score(p, r):
        return (rope3d(q, p, freqs, sections, interleaved) * rope3d(k, r, freqs, sections, interleaved)).sum()

    assert torch.allclose(score(p + shift, r + shift), score(p, r), rtol=1e-10, atol=1e-10 * head_dim)


@OP_SETTINGS
@given(problem=rope_problems(st.sampled_from([torch.float32, torch.float64])))
def test_negated_freqs_invert_the_rotation(problem):
    x, coords, freqs, sections, interleaved = problem
    restored = rope3d(rope3d(x, coords, freqs, sections, interleaved), coords, -freqs, sections, interleaved)
    assert_matches(restored, x, TOLERANCES[x.dtype].forward, "rope3d(rope3d(x, f), -f)")


@OP_SETTINGS
@given(problem=rope_problems(), seed=seeds)
def test_backward_is_the_rotation_by_negated_freqs(problem, seed):
    x, coords, freqs, sections, interleaved = problem
    grad_out, grad_x = rope3d_gradient(problem, seed)
    assert torch.equal(grad_x, rope3d(grad_out, coords, -freqs, sections, interleaved))


def test_no_gradient_flows_to_coords_or_freqs():
    generator = generator_from(3)
    (x,) = make_token_head_tensors(1, 4, 1, 8, torch.float32, "contiguous", generator, requires_grad=True)
    coords = random_coords(4, generator).requires_grad_(True)
    freqs = rope_freqs(8).requires_grad_(True)
    rope3d(x, coords, freqs, (2, 1, 1)).sum().backward()
    assert x.grad is not None
    assert coords.grad is None and freqs.grad is None


@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION)
@pytest.mark.parametrize("interleaved", [False, True])
def test_large_input_matches_reference(dtype, interleaved):
    # The shape of one attention layer of the standard workload, big enough for every thread to work.
    generator = generator_from(4)
    (x,) = make_token_head_tensors(1, 2000, 6, 64, dtype, "qkv", generator)
    coords = random_coords(2000, generator)
    freqs = rope_freqs(64)
    out = rope3d(x, coords, freqs, (12, 10, 10), interleaved)
    expected = reference_float64(x, coords, freqs, (12, 10, 10), interleaved)
    assert_matches(out, expected, TOLERANCES[dtype].forward, "rope3d output")
