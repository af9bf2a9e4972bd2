"""What the op tests share: tolerances per dtype, input layouts, packed-batch builders and
hypothesis strategies.

Low-precision results are always compared with a float64 reference computed from the same rounded
inputs, so the tolerances below bound the op's own arithmetic, not the rounding of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mmv.ops import rope_freqs


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|``, elementwise.

    ``atol`` grows with the largest magnitude in the reference, so one tolerance serves outputs and
    gradients of any scale. It never shrinks below that of unit-scale values: rounding errors come
    from intermediate terms as large as the standard-normal inputs even where a result cancels to
    zero (the query gradient of a one-token sequence).
    """

    rtol: float
    atol: float


@dataclass(frozen=True)
class DtypeTolerances:
    """What one dtype is held to: ``forward`` for op outputs, ``backward`` for gradients."""

    forward: Tolerance
    backward: Tolerance


# The one place where the accuracy asked of the ops is stated. float32 and float64 accumulate in
# their own precision; bfloat16 and float16 accumulate in float32 but round the result (and, in the
# attention kernels, the probabilities and score gradients fed to matrix units) to 8 or 11 bits.
TOLERANCES: dict[torch.dtype, DtypeTolerances] = {
    torch.float64: DtypeTolerances(Tolerance(rtol=1e-9, atol=1e-9), Tolerance(rtol=1e-8, atol=1e-8)),
    torch.float32: DtypeTolerances(Tolerance(rtol=2e-5, atol=2e-5), Tolerance(rtol=1e-4, atol=1e-4)),
    torch.bfloat16: DtypeTolerances(Tolerance(rtol=1.6e-2, atol=1e-2), Tolerance(rtol=3e-2, atol=3e-2)),
    torch.float16: DtypeTolerances(Tolerance(rtol=2e-3, atol=2e-3), Tolerance(rtol=5e-3, atol=5e-3)),
}

LOW_AND_SINGLE_PRECISION = (torch.float32, torch.bfloat16, torch.float16)

# Modest example counts: the whole suite runs on two cores. No deadline, since the machines are shared.
OP_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance, what: str) -> None:
    """Compare ``actual`` with a (usually float64) reference under ``tolerance``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = expected.double()
    magnitude = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(),
        expected,
        rtol=tolerance.rtol,
        atol=tolerance.atol * magnitude,
        msg=lambda detail: f"{what}: {detail}",
    )


# How a (T, H, D) operand is laid out in memory. All keep the last dimension contiguous, which the ops
# require; the others exercise the token and head strides.
LAYOUTS = (
    "contiguous",
    "qkv",  # views qkv[:, i] of one packed (T, 3, H, D) projection
    "head_major",  # a (H, T, D) buffer seen as (T, H, D): head stride larger than token stride
    "padded_rows",  # rows of D + 3 elements: no row starts on a vector boundary
)


def make_token_head_tensors(
    count: int,
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    layout: str,
    generator: torch.Generator,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``count`` standard-normal ``(T, H, D)`` tensors of ``dtype`` with the given memory layout.

    With ``requires_grad`` the returned tensors are views of leaf buffers, so gradients can be taken
    with respect to them by ``torch.autograd.grad``.
    """

    def buffer(*shape: int) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator).to(dtype)
        return values.requires_grad_(requires_grad)

    T, H, D = num_tokens, num_heads, head_dim
    if layout == "contiguous":
        return tuple(buffer(T, H, D) for _ in range(count))
    if layout == "qkv":
        packed = buffer(T, max(count, 3), H, D)
        return tuple(packed[:, i] for i in range(count))
    if layout == "head_major":
        return tuple(buffer(H, T, D).transpose(0, 1) for _ in range(count))
    if layout == "padded_rows":
        return tuple(buffer(T, H, D + 3)[:, :, :D] for _ in range(count))
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    """int32 ``(B + 1,)`` offsets of sequences of the given lengths packed end to end."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32)


def random_coords(num_tokens: int, generator: torch.Generator, extent_mm: float = 400.0) -> torch.Tensor:
    """float32 ``(T, 3)`` token positions spread over ``[-extent_mm, extent_mm]`` on every axis."""
    return (torch.rand(num_tokens, 3, generator=generator, dtype=torch.float64) * 2 - 1).mul(extent_mm).float()


def generator_from(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


seeds = st.integers(min_value=0, max_value=2**32 - 1)
layouts = st.sampled_from(LAYOUTS)
dtypes = st.sampled_from(LOW_AND_SINGLE_PRECISION)
# Attention takes any head_dim in [1, 256]; rope3d an even one. Small values are drawn more often.
attention_head_dims = st.one_of(st.integers(1, 16), st.integers(17, 256))
rope_head_dims = st.one_of(st.integers(1, 8), st.integers(9, 128)).map(lambda half: 2 * half)

# A sequence is empty, a single token, short (an X-ray's few hundred tokens, scaled down), or long
# enough to span several tiles of any kernel.
sequence_lengths = st.one_of(st.just(0), st.just(1), st.integers(2, 40), st.integers(41, 200))


@st.composite
def packed_lengths(draw, max_sequences: int = 6, max_tokens: int = 400) -> list[int]:
    """Lengths of a packed batch: a mix of empty, single-token, short and long sequences."""
    lengths = draw(st.lists(sequence_lengths, min_size=1, max_size=max_sequences))
    while sum(lengths) > max_tokens:
        lengths[lengths.index(max(lengths))] //= 2
    return lengths


# None: the default D^-1/2. The others include a zero scale (uniform attention), a negative one and one
# large enough for scores of tens, which tests the online softmax's running maximum.
scales = st.sampled_from([None, 0.0, -0.3, 0.05, 1.0])


@st.composite
def attention_problems(draw, dtype_strategy=dtypes, head_dim_strategy=attention_head_dims):
    """CPU q, k, v of a packed batch in one of the layouts, with its lengths and scale."""
    lengths = draw(packed_lengths())
    num_heads = draw(st.integers(1, 3))
    head_dim = draw(head_dim_strategy)
    dtype = draw(dtype_strategy)
    layout = draw(layouts)
    generator = generator_from(draw(seeds))
    q, k, v = make_token_head_tensors(3, sum(lengths), num_heads, head_dim, dtype, layout, generator)
    return q, k, v, lengths, draw(scales)


NON_FINITE_VALUES = (float("nan"), float("inf"), float("-inf"))


@st.composite
def non_finite_attention_problems(draw, dtype_strategy=dtypes, head_dim_strategy=attention_head_dims):
    """``attention_problems`` with one to three elements of q, k or v set to NaN, +inf or -inf (none when
    the batch has no tokens), as a diverging training run would feed them."""
    q, k, v, lengths, scale = draw(attention_problems(dtype_strategy, head_dim_strategy))
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens:
        for _ in range(draw(st.integers(1, 3))):
            target = draw(st.sampled_from((q, k, v)))
            token, head = draw(st.integers(0, num_tokens - 1)), draw(st.integers(0, num_heads - 1))
            target[token, head, draw(st.integers(0, head_dim - 1))] = draw(st.sampled_from(NON_FINITE_VALUES))
    return q, k, v, lengths, scale


def assert_same_non_finite(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tolerance: Tolerance,
    what: str,
    may_be_nan: torch.Tensor | None = None,
) -> None:
    """``actual`` is non-finite exactly where ``expected`` is, and its finite elements match under
    ``tolerance``: NaN where ``expected`` is NaN, and the same infinity or NaN where ``expected`` is
    infinite (sums that meet infinities in another order give inf - inf). Where the boolean
    ``may_be_nan`` (broadcast to the shape) is set, ``actual`` may also be NaN where ``expected`` is finite.
    It is never finite where ``expected`` is not."""
    actual, expected = actual.double(), expected.double()
    loose = torch.zeros(expected.shape, dtype=torch.bool) if may_be_nan is None else may_be_nan.expand(expected.shape)
    allowed_nan = expected.isinf() | loose
    wrong = (
        (expected.isnan() & actual.isnan().logical_not())
        | (expected.isinf() & (actual != expected) & actual.isnan().logical_not())
        | (expected.isfinite() & actual.isfinite().logical_not() & (actual.isnan() & allowed_nan).logical_not())
    )
    if wrong.any():
        first = tuple(wrong.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(wrong.sum())} elements non-finite where the reference is not, or the other way round; "
            f"first at {first}: {actual[first].item()} where the reference has {expected[first].item()}"
        )
    compared = expected.isfinite() & actual.isfinite()
    assert_matches(actual.where(compared, 0.0), expected.where(compared, 0.0), tolerance, what)


@st.composite
def rope_sections(draw, num_pairs: int) -> tuple[int, int, int]:
    """(s_z, s_y, s_x) that either cover all ``num_pairs`` pairs or leave some unrotated."""
    s_z = draw(st.integers(0, num_pairs))
    s_y = draw(st.integers(0, num_pairs - s_z))
    covers_all = draw(st.booleans())
    s_x = num_pairs - s_z - s_y if covers_all else draw(st.integers(0, num_pairs - s_z - s_y))
    return (s_z, s_y, s_x)


@st.composite
def rope_problems(draw, dtype_strategy=dtypes):
    """Inputs of one rope3d call: x in some layout, coordinates in millimetres, frequencies, sections."""
    head_dim = draw(rope_head_dims)
    num_pairs = head_dim // 2
    sections = draw(rope_sections(num_pairs))
    num_tokens = draw(st.one_of(st.just(0), st.just(1), st.integers(2, 48)))
    num_heads = draw(st.integers(1, 4))
    dtype = draw(dtype_strategy)
    layout = draw(layouts)
    generator = generator_from(draw(seeds))
    (x,) = make_token_head_tensors(1, num_tokens, num_heads, head_dim, dtype, layout, generator)
    # Coordinates in mm reach hundreds of radians at frequency 1; random frequencies include negative
    # ones and ones that are not of the default geometric form.
    coords = random_coords(num_tokens, generator)
    if draw(st.booleans()):
        freqs = rope_freqs(head_dim, sections, base=draw(st.sampled_from([10.0, 100.0, 10000.0])))
    else:
        freqs = (torch.rand(num_pairs, generator=generator) * 3 - 1.5).float()
    interleaved = draw(st.booleans())
    return x, coords, freqs, sections, interleaved
