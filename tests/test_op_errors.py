"""Every bad input of docs/design.md ("Bad input, for every op") and csrc/checks.h raises a Python exception
whose message names the argument: through the compiled CPU kernels, the public functions and the
reference fallback."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch
from helpers.bad_inputs import (
    ATTENTION_BAD_INPUTS,
    BACKWARD_BAD_INPUTS,
    ROPE_BAD_INPUTS,
    assert_names_argument,
    backward_inputs,
    kernel_scalars,
    replaced,
    valid_attention_args,
    valid_rope_args,
)

from mmv.ops import packed_attention, rope3d

# Calls the CPU kernel itself even when an argument lives on another device, which the dispatcher
# would otherwise route elsewhere: the kernel's own device check is what is under test.
CPU_KERNEL_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@pytest.fixture(params=["kernel", "reference_fallback"])
def op_path(request, monkeypatch):
    """The path mmv.ops takes: its kernel, or its plain PyTorch fallback as on a device without one."""
    if request.param == "kernel":
        yield
        return
    for module in ("mmv.ops.rope3d", "mmv.ops.packed_attention"):
        monkeypatch.setattr(importlib.import_module(module), "has_kernel", lambda op_name, device_type: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# rope3d ------------------------------------------------------------------------------------------


def call_rope3d_kernel(args: dict) -> torch.Tensor:
    return torch.ops.mmv.rope3d.default.redispatch(
        CPU_KERNEL_ONLY, args["x"], args["coords"], args["freqs"], args["sections"], args["interleaved"]
    )


@pytest.mark.parametrize("bad", ROPE_BAD_INPUTS, ids=str)
def test_rope3d_kernel_rejects(bad):
    with pytest.raises(bad.error) as raised:
        call_rope3d_kernel(bad.change(valid_rope_args()))
    assert_names_argument(raised, bad.argument)


@pytest.mark.parametrize("bad", ROPE_BAD_INPUTS, ids=str)
def test_rope3d_rejects(bad, op_path):
    with pytest.raises(bad.error) as raised:
        rope3d(**bad.change(valid_rope_args()))
    assert_names_argument(raised, bad.argument)


def test_rope3d_rejects_sections_beyond_int64(op_path):
    with pytest.raises(ValueError) as raised:
        rope3d(**replaced(sections=lambda a: [2**64, 0, 0])(valid_rope_args()))
    assert_names_argument(raised, "sections")


# packed_attention ---------------------------------------------------------------------------------


def call_attention_fwd_kernel(args: dict):
    max_seqlen, scale = kernel_scalars(args)
    return torch.ops.mmv.packed_attention_fwd.default.redispatch(
        CPU_KERNEL_ONLY, args["q"], args["k"], args["v"], args["cu_seqlens"], max_seqlen, scale
    )


def call_attention_bwd_kernel(args: dict):
    args = backward_inputs(args)
    max_seqlen, scale = kernel_scalars(args)
    return torch.ops.mmv.packed_attention_bwd.default.redispatch(
        CPU_KERNEL_ONLY,
        args["dout"],
        args["q"],
        args["k"],
        args["v"],
        args["out"],
        args["lse"],
        args["cu_seqlens"],
        max_seqlen,
        scale,
    )


@pytest.mark.parametrize("bad", ATTENTION_BAD_INPUTS, ids=str)
def test_packed_attention_fwd_kernel_rejects(bad):
    with pytest.raises(bad.error) as raised:
        call_attention_fwd_kernel(bad.change(valid_attention_args()))
    assert_names_argument(raised, bad.argument)


@pytest.mark.parametrize("bad", ATTENTION_BAD_INPUTS, ids=str)
def test_packed_attention_bwd_kernel_rejects(bad):
    with pytest.raises(bad.error) as raised:
        call_attention_bwd_kernel(bad.change(valid_attention_args()))
    assert_names_argument(raised, bad.argument)


@pytest.mark.parametrize("bad", ATTENTION_BAD_INPUTS, ids=str)
def test_packed_attention_rejects(bad, op_path):
    with pytest.raises(bad.error) as raised:
        packed_attention(**bad.change(valid_attention_args()))
    assert_names_argument(raised, bad.argument)


@pytest.mark.parametrize("bad", BACKWARD_BAD_INPUTS, ids=str)
def test_packed_attention_bwd_kernel_rejects_saved_tensors(bad):
    args = bad.change(backward_inputs(valid_attention_args()))
    with pytest.raises(bad.error) as raised:
        call_attention_bwd_kernel(args)
    assert_names_argument(raised, bad.argument)


@pytest.mark.parametrize("max_seqlen", [7.0, "7", torch.tensor([7])], ids=["float", "str", "tensor"])
def test_packed_attention_rejects_a_max_seqlen_that_is_not_an_integer(max_seqlen, op_path):
    with pytest.raises(TypeError) as raised:
        packed_attention(**replaced(max_seqlen=lambda a: max_seqlen)(valid_attention_args()))
    assert_names_argument(raised, "max_seqlen")


def test_packed_attention_takes_any_integer_as_max_seqlen(op_path):
    args = valid_attention_args()
    expected = packed_attention(**args)
    for max_seqlen in (np.int64(7), np.int32(7)):
        torch.testing.assert_close(packed_attention(**{**args, "max_seqlen": max_seqlen}), expected, rtol=0, atol=0)
