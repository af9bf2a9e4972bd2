"""Every bad input of docs/design.md ("Bad input, for every op"), as valid arguments changed in one way,
with the exception each must raise and the argument its message must name."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers.op_inputs import cu_seqlens_of

from mmv.ops import rope_freqs

NUM_TOKENS, NUM_HEADS, HEAD_DIM = 10, 2, 8


OTHER_DEVICE = "meta"  # the only second device every machine has


@dataclass(frozen=True)
class BadInput:
    """Valid arguments changed in one way, and the exception that must follow."""

    case: str
    change: Callable[[dict], dict]
    error: type[Exception]
    argument: str  # what the message must name

    def __str__(self) -> str:
        return self.case


def replaced(**changes: Callable[[dict], object]) -> Callable[[dict], dict]:
    """A change of the named arguments, each computed from the valid ones."""
    return lambda args: {**args, **{name: make(args) for name, make in changes.items()}}


def assert_names_argument(raised: pytest.ExceptionInfo, argument: str) -> None:
    message = str(raised.value)
    assert re.search(rf"\b{re.escape(argument)}\b", message), f"{argument!r} not named in: {message}"


def valid_rope_args() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=generator),
        "coords": torch.randn(NUM_TOKENS, 3, generator=generator),
        "freqs": rope_freqs(HEAD_DIM, (2, 1, 1)),
        "sections": [2, 1, 1],
        "interleaved": False,
    }


ROPE_BAD_INPUTS = [
    BadInput("x_integer", replaced(x=lambda a: a["x"].int()), TypeError, "x"),
    BadInput("x_two_dims", replaced(x=lambda a: a["x"][:, 0]), ValueError, "x"),
    BadInput("x_four_dims", replaced(x=lambda a: a["x"][None]), ValueError, "x"),
    BadInput(
        "x_head_dim_strided",
        replaced(x=lambda a: torch.randn(NUM_TOKENS, NUM_HEADS, 2 * HEAD_DIM)[..., ::2]),
        ValueError,
        "x",
    ),
    BadInput(
        "x_odd_head_dim",
        replaced(x=lambda a: torch.randn(NUM_TOKENS, NUM_HEADS, 7), freqs=lambda a: torch.ones(3)),
        ValueError,
        "head_dim",
    ),
    BadInput("coords_float64", replaced(coords=lambda a: a["coords"].double()), TypeError, "coords"),
    BadInput("coords_two_axes", replaced(coords=lambda a: a["coords"][:, :2]), ValueError, "coords"),
    BadInput("coords_one_dim", replaced(coords=lambda a: a["coords"][:, 0]), ValueError, "coords"),
    BadInput("coords_too_many_tokens", replaced(coords=lambda a: torch.zeros(NUM_TOKENS + 1, 3)), ValueError, "coords"),
    BadInput("coords_other_device", replaced(coords=lambda a: a["coords"].to(OTHER_DEVICE)), ValueError, "coords"),
    BadInput("freqs_float64", replaced(freqs=lambda a: a["freqs"].double()), TypeError, "freqs"),
    BadInput("freqs_too_long", replaced(freqs=lambda a: torch.ones(HEAD_DIM // 2 + 1)), ValueError, "freqs"),
    BadInput("freqs_two_dims", replaced(freqs=lambda a: a["freqs"][None]), ValueError, "freqs"),
    BadInput("freqs_other_device", replaced(freqs=lambda a: a["freqs"].to(OTHER_DEVICE)), ValueError, "freqs"),
    BadInput("sections_two_axes", replaced(sections=lambda a: [2, 2]), ValueError, "sections"),
    BadInput("sections_four_axes", replaced(sections=lambda a: [1, 1, 1, 1]), ValueError, "sections"),
    BadInput("sections_negative", replaced(sections=lambda a: [3, -1, 1]), ValueError, "sections"),
    BadInput("sections_beyond_head_dim", replaced(sections=lambda a: [2, 2, 1]), ValueError, "sections"),
    # Sums that overflow int64 once wrapped to a small number and reached a C++ allocation.
    BadInput("sections_sum_overflows", replaced(sections=lambda a: [2**63 - 1, 1, 0]), ValueError, "sections"),
    BadInput(
        "sections_sum_wraps_to_zero", replaced(sections=lambda a: [2**62, 2**62, 2**63 - 1]), ValueError, "sections"
    ),
    BadInput("sections_huge", replaced(sections=lambda a: [2**63 - 1, 0, 0]), ValueError, "sections"),
]


LENGTHS = [3, 0, 7]  # NUM_TOKENS in all


def valid_attention_args() -> dict:
    generator = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, NUM_TOKENS, NUM_HEADS, HEAD_DIM, generator=generator)
    return {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens_of(LENGTHS), "max_seqlen": max(LENGTHS), "scale": None}


def head_dim_strided(args: dict) -> torch.Tensor:
    return torch.randn(NUM_TOKENS, NUM_HEADS, 2 * HEAD_DIM)[..., ::2]


def with_head_dim(head_dim: int) -> Callable[[dict], dict]:
    return replaced(**{name: (lambda a: torch.randn(NUM_TOKENS, NUM_HEADS, head_dim)) for name in "qkv"})


def cu_seqlens_values(*values: int) -> Callable[[dict], dict]:
    return replaced(cu_seqlens=lambda a: torch.tensor(values, dtype=torch.int32))


ATTENTION_BAD_INPUTS = [
    BadInput("q_integer", replaced(q=lambda a: a["q"].int()), TypeError, "q"),
    BadInput("k_dtype_differs", replaced(k=lambda a: a["k"].double()), TypeError, "k"),
    BadInput("v_dtype_differs", replaced(v=lambda a: a["v"].bfloat16()), TypeError, "v"),
    BadInput("q_two_dims", replaced(q=lambda a: a["q"][:, 0]), ValueError, "q"),
    BadInput("k_four_dims", replaced(k=lambda a: a["k"][None]), ValueError, "k"),
    BadInput("k_shape_differs", replaced(k=lambda a: a["k"][:, :1]), ValueError, "k"),
    BadInput("v_shape_differs", replaced(v=lambda a: a["v"][:-1]), ValueError, "v"),
    BadInput("q_head_dim_strided", replaced(q=head_dim_strided), ValueError, "q"),
    BadInput("k_head_dim_strided", replaced(k=head_dim_strided), ValueError, "k"),
    BadInput("v_head_dim_strided", replaced(v=head_dim_strided), ValueError, "v"),
    BadInput("head_dim_over_256", with_head_dim(257), ValueError, "head_dim"),
    BadInput("head_dim_zero", with_head_dim(0), ValueError, "head_dim"),
    BadInput("k_other_device", replaced(k=lambda a: a["k"].to(OTHER_DEVICE)), ValueError, "k"),
    BadInput(
        "cu_seqlens_other_device",
        replaced(cu_seqlens=lambda a: a["cu_seqlens"].to(OTHER_DEVICE)),
        ValueError,
        "cu_seqlens",
    ),
    BadInput("cu_seqlens_int64", replaced(cu_seqlens=lambda a: a["cu_seqlens"].long()), TypeError, "cu_seqlens"),
    BadInput("cu_seqlens_two_dims", replaced(cu_seqlens=lambda a: a["cu_seqlens"][None]), ValueError, "cu_seqlens"),
    BadInput("cu_seqlens_empty", cu_seqlens_values(), ValueError, "cu_seqlens"),
    BadInput("cu_seqlens_not_from_zero", cu_seqlens_values(1, 3, 3, NUM_TOKENS), ValueError, "cu_seqlens"),
    BadInput("cu_seqlens_decreasing", cu_seqlens_values(0, 5, 3, NUM_TOKENS), ValueError, "cu_seqlens"),
    BadInput("cu_seqlens_short_of_tokens", cu_seqlens_values(0, 3, 3, NUM_TOKENS - 1), ValueError, "cu_seqlens"),
    BadInput("cu_seqlens_past_tokens", cu_seqlens_values(0, 3, 4, NUM_TOKENS + 1), ValueError, "cu_seqlens"),
    BadInput("sequence_longer_than_max_seqlen", replaced(max_seqlen=lambda a: 6), ValueError, "max_seqlen"),
    BadInput("max_seqlen_below_minus_one", replaced(max_seqlen=lambda a: -2), ValueError, "max_seqlen"),
    BadInput("scale_nan", replaced(scale=lambda a: float("nan")), ValueError, "scale"),
    BadInput("scale_infinite", replaced(scale=lambda a: float("inf")), ValueError, "scale"),
]


def kernel_scalars(args: dict) -> tuple[int, float]:
    """max_seqlen and scale as the op schemas take them: -1 for no bound, a scale always given."""
    max_seqlen = -1 if args["max_seqlen"] is None else args["max_seqlen"]
    return max_seqlen, 1.0 if args["scale"] is None else args["scale"]


def backward_inputs(args: dict) -> dict:
    """The tensors autograd would hand the backward op, shaped after q whatever q is."""
    q = args["q"]
    like_q = torch.zeros(q.shape, dtype=q.dtype if q.is_floating_point() else torch.float32)
    tokens, heads = (q.shape[0], q.shape[1]) if q.dim() >= 2 else (q.shape[0], 1)
    return {"dout": like_q, "out": like_q.clone(), "lse": torch.zeros(heads, tokens), **args}


# What only the backward op receives: autograd's gradient and the forward's saved out and lse.
BACKWARD_BAD_INPUTS = [
    BadInput("dout_shape_differs", replaced(dout=lambda a: a["dout"][:-1]), ValueError, "dout"),
    BadInput("dout_dtype_differs", replaced(dout=lambda a: a["dout"].double()), TypeError, "dout"),
    BadInput("dout_head_dim_strided", replaced(dout=head_dim_strided), ValueError, "dout"),
    BadInput("out_shape_differs", replaced(out=lambda a: a["out"][:, :1]), ValueError, "out"),
    BadInput("out_dtype_differs", replaced(out=lambda a: a["out"].bfloat16()), TypeError, "out"),
    BadInput("lse_tokens_first", replaced(lse=lambda a: a["lse"].T.contiguous()), ValueError, "lse"),
    BadInput("lse_bfloat16", replaced(lse=lambda a: a["lse"].bfloat16()), TypeError, "lse"),
    BadInput("lse_other_device", replaced(lse=lambda a: a["lse"].to(OTHER_DEVICE)), ValueError, "lse"),
]
