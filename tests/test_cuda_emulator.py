"""The CUDA emulator's checkers, each shown firing on a kernel with one planted bug, and quiet on the
same kernel without it; and its models of ldmatrix and mma against plain matrix products.

The kernels are those of tests/cuda/planted_bugs.cu, built into mmv_emulated (tests/emulated_cuda.py).
"""

from __future__ import annotations

import pytest
import torch

import emulated_cuda

pytestmark = pytest.mark.skipif(not emulated_cuda.supported(), reason="the CUDA emulator needs x86-64 Linux")


@pytest.fixture(scope="module", autouse=True)
def emulator():
    emulated_cuda.load()
    previous = torch.ops.mmv_emulated.device()
    yield
    torch.ops.mmv_emulated.set_device(previous)


def planted(name: str, plant: bool, x: torch.Tensor, bug: int = 1) -> torch.Tensor:
    """Runs planted-bug kernel `name` with x in guarded memory, as the emulated ops run."""
    return emulated_cuda.run_guarded(torch.ops.mmv_emulated.planted_bug.default, name, plant, x, bug)


def rows() -> torch.Tensor:
    """32 rows of 8 distinct bfloat16 values."""
    return (torch.arange(32 * 8, dtype=torch.float32) / 4).to(torch.bfloat16).reshape(32, 8)


def ldmatrix_expected(x: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """What ldmatrix.x4 hands each lane (PTX ISA): register i of lane l holds the pair (row l / 4,
    columns 2 (l % 4), 2 (l % 4) + 1) of matrix i, whose rows lanes 8i..8i+7 address."""
    bits = x.view(torch.int16).to(torch.int64) & 0xFFFF
    out = torch.empty(32, 4, dtype=torch.int64)
    for lane in range(32):
        for i in range(4):
            row = (8 * i + lane // 4 + shift) % 32
            out[lane, i] = bits[row, 2 * (lane % 4)] | bits[row, 2 * (lane % 4) + 1] << 16
    return out.to(torch.int32)


def test_ldmatrix_hands_each_lane_its_pairs():
    x = rows()
    assert torch.equal(planted("ldmatrix", False, x), ldmatrix_expected(x))


def test_mma_computes_the_product_from_ldmatrix_fragments():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=generator).to(torch.bfloat16)
    b_t = torch.randn(8, 16, generator=generator).to(torch.bfloat16)
    x = torch.cat([a, b_t, torch.zeros(8, 16, dtype=torch.bfloat16)])
    expected = a.double() @ b_t.double().T
    torch.testing.assert_close(planted("mma", False, x).double(), expected, rtol=1e-6, atol=1e-6)


def test_race_missing_barrier_between_copy_and_read():
    with pytest.raises(RuntimeError, match=r"ldmatrix_kernel.*block \(0, 0, 0\) thread \(0, 0, 0\): race: .*thread 1 wrote"):
        planted("ldmatrix", True, rows(), bug=1)


def test_read_of_cp_async_data_before_wait_group():
    with pytest.raises(RuntimeError, match=r"ldmatrix_kernel.*thread \(0, 0, 0\): .*has not landed yet"):
        planted("ldmatrix", True, rows(), bug=2)


def test_read_of_shared_memory_nobody_wrote():
    # Off by one row: lane 31 addresses row 32, past the rows the warp copied.
    with pytest.raises(RuntimeError, match=r"thread \(31, 0, 0\): ldmatrix.x4 reads shared memory at offset 512 that no thread"):
        planted("ldmatrix", True, rows(), bug=3)


def test_misaligned_ldmatrix_row_address():
    with pytest.raises(RuntimeError, match=r"thread \(0, 0, 0\): ldmatrix.x4 at offset 8 is not 16-byte aligned"):
        planted("ldmatrix", True, rows(), bug=4)


def test_write_after_read_race_in_a_pipeline_without_its_trailing_barrier():
    x = torch.arange(4 * 32 * 8, dtype=torch.float32).to(torch.bfloat16).reshape(4 * 32, 8)
    result = planted("pipeline", False, x)
    for step in range(4):
        assert torch.equal(result[32 * step : 32 * step + 32], ldmatrix_expected(x[32 * step : 32 * step + 32], 1))
    with pytest.raises(RuntimeError, match=r"pipeline_kernel.*race: cp.async overwrites shared memory .* read with no __syncthreads"):
        planted("pipeline", True, x)


def test_global_read_past_the_end_of_a_tensor():
    x = torch.arange(64, dtype=torch.float32)
    assert torch.equal(planted("neighbour_sum", False, x), x + torch.cat([x[1:], torch.zeros(1)]))
    with pytest.raises(RuntimeError, match=r"neighbour_sum_kernel.*block \(0, 0, 0\) thread \(63, 0, 0\): invalid global memory access: .* 0 bytes past the end of an allocation of 256 bytes"):
        planted("neighbour_sum", True, x)


def test_divergent_barrier():
    x = torch.arange(64, dtype=torch.float32)
    assert planted("block_sum", False, x).item() == x.sum().item()
    with pytest.raises(RuntimeError, match=r"block_sum_kernel.*thread \((3[2-9]|[45][0-9]|6[0-3]), 0, 0\): divergent __syncthreads: 32 threads wait at a barrier"):
        planted("block_sum", True, x, bug=1)


def test_shuffle_mask_that_leaves_out_lanes():
    with pytest.raises(RuntimeError, match=r"block_sum_kernel.*__shfl_xor_sync .*not in its mask|leaves out the calling lane"):
        planted("block_sum", True, torch.ones(64), bug=2)


def test_shuffle_mask_naming_exited_lanes():
    with pytest.raises(RuntimeError, match=r"block_sum_kernel.*thread \(16, 0, 0\): this lane exited, but lane 0 waits for it at __shfl_xor_sync"):
        planted("block_sum", True, torch.ones(64), bug=3)


@pytest.mark.parametrize("device", emulated_cuda.DEVICES)
def test_launch_limits(device):
    torch.ops.mmv_emulated.set_device(device)
    torch.ops.mmv_emulated.launch_empty(1024, 48 * 1024)
    with pytest.raises(RuntimeError, match="1025 threads per block"):
        torch.ops.mmv_emulated.launch_empty(1025, 0)
    with pytest.raises(RuntimeError, match="65536 bytes of dynamic shared memory: more than the 49152 allowed"):
        torch.ops.mmv_emulated.launch_empty(128, 64 * 1024)
    optin = {"H100": 227 * 1024, "A100": 163 * 1024}[device]
    torch.ops.mmv_emulated.launch_empty(128, optin, optin)
    with pytest.raises(RuntimeError, match=f"beyond the {optin} bytes of opt-in shared memory of the {device}"):
        torch.ops.mmv_emulated.launch_empty(128, optin + 16, optin + 16)
    with pytest.raises(RuntimeError, match=f"more than the {optin} a block may opt in to on the {device}"):
        torch.ops.mmv_emulated.launch_empty(128, optin + 16)


launch_bounds_checked = pytest.mark.skipif(emulated_cuda.launch_bounds_unavailable() is not None,
                                           reason=str(emulated_cuda.launch_bounds_unavailable()))


@launch_bounds_checked
def test_launch_beyond_the_kernels_launch_bounds():
    x = torch.arange(64, dtype=torch.float32)
    assert torch.equal(planted("bounded", False, x), 2 * x)
    with pytest.raises(RuntimeError, match=r"invalid launch of bounded_kernel<kThreads> at .*planted_bugs\.cu:\d+: "
                       r"128 threads per block \(128 x 1 x 1\): more than the 64 of the kernel's __launch_bounds__ "
                       r"\(void mmv::\(anonymous namespace\)::bounded_kernel<64>\(float const\*, float\*\)\)"):
        planted("bounded", True, x)


@launch_bounds_checked
def test_a_table_of_launch_bounds_the_emulator_cannot_use_is_refused_and_the_one_in_force_kept():
    # Anonymous-namespace kernels of two sources demangle alike: bounds that disagree cannot be told apart.
    twins = ["_ZN12_GLOBAL__N_16kernelEPf", "_ZN12_GLOBAL__N_16kernelEPf"]
    with pytest.raises(ValueError, match=r"two kernels named \(anonymous namespace\)::kernel\(float\*\) declare "
                       r"different __launch_bounds__ \(64 and 128 threads\)"):
        torch.ops.mmv_emulated.set_launch_bounds(twins, [64, 128])
    with pytest.raises(ValueError, match="max_threads must have 2 values, one per entry, got 1"):
        torch.ops.mmv_emulated.set_launch_bounds(twins, [64])
    with pytest.raises(ValueError, match="max_threads must be positive, got 0"):
        torch.ops.mmv_emulated.set_launch_bounds(twins[:1], [0])
    with pytest.raises(RuntimeError, match=r"more than the 64 of the kernel's __launch_bounds__"):
        planted("bounded", True, torch.arange(64, dtype=torch.float32))


def test_launch_bounds_are_read_from_the_ptx_directive():
    ptx = """
.visible .entry _Z6scaledPf(
	.param .u64 _Z6scaledPf_param_0
)
	.maxntid 32, 4, 1
	.minnctapersm 2
{
	ret;
}
.entry _ZN12_GLOBAL__N_15plainEv()
{
	ret;
}
.entry _ZN12_GLOBAL__N_13oneEv()
.maxntid 96
{
}
"""
    assert emulated_cuda.launch_bounds(ptx) == {"_Z6scaledPf": 128, "_ZN12_GLOBAL__N_13oneEv": 96}


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="name must be H100 or A100"):
        torch.ops.mmv_emulated.set_device("V100")


def test_mmv_ops_run_the_emulated_kernels_within_the_mode():
    from mmv.ops import packed_attention, rope3d, rope_freqs

    q, k, v = (torch.randn(10, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32)
    with emulated_cuda.emulated("A100") as mode:
        assert torch.ops.mmv_emulated.device() == "A100"
        out = packed_attention(q, k, v, cu_seqlens)
        out.sum().backward()
        rope3d(q.detach(), torch.zeros(10, 3), rope_freqs(64), (10, 10, 10))
    assert mode.calls == {
        "mmv_emulated::packed_attention_fwd": 1,
        "mmv_emulated::packed_attention_bwd": 1,
        "mmv_emulated::rope3d": 1,
    }


@launch_bounds_checked
def test_the_bound_of_every_kernel_the_ops_launch_is_known():
    from mmv.ops import packed_attention, rope3d, rope_freqs

    q, k, v = (torch.randn(10, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with emulated_cuda.emulated("H100"):
        packed_attention(q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32)).sum().backward()
        rope3d(q.detach().float(), torch.zeros(10, 3), rope_freqs(64), (10, 10, 10))
    launched = dict(zip(*torch.ops.mmv_emulated.kernel_bounds()))
    assert any(name.startswith("void mmv::(anonymous namespace)::rope3d_kernel<float, ") for name in launched)
    assert any("forward_mma_kernel<__nv_bfloat16, " in name for name in launched)
    assert any("backward_mma_kernel<__nv_bfloat16, " in name for name in launched)
    # Every kernel of csrc/cuda and tests/cuda declares __launch_bounds__: one found without was not
    # matched with its PTX entry.
    assert all(bound > 0 for bound in launched.values()), launched
