"""mmv's CUDA kernels against the float64 reference and the CPU kernels.

packed_attention on each of its CUDA paths (tensor cores for bfloat16 / float16 with head_dim 32, 64
and 128; the plain kernel for float32, float64, other head dims), forward and backward, with strided
views, empty and single-token sequences, skewed batches of many short and few long sequences,
deterministic mode, unchecked cu_seqlens and the bad inputs of the CPU tests; rope3d including its
element-wise path for views that are not 16-byte aligned.

Every test runs on each backend of the ``backend`` fixture: "cuda" on an NVIDIA GPU (skipped without
one), and always the same kernels on the CUDA emulator (tests/emulated_cuda.py) as a modelled H100 and
A100, with CPU tensors standing in for device memory and every checker of the emulator on. Large cases
are marked ``slow_emulation`` on the emulator: ``make test`` leaves them out, ``make test-emulated``
runs them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import emulated_cuda
import pytest
import torch
from helpers.attention_reference import (
    check_non_finite_against_reference,
    reference_float64,
    reference_gradients_float64,
)
from helpers.bad_inputs import (
    ATTENTION_BAD_INPUTS,
    BACKWARD_BAD_INPUTS,
    ROPE_BAD_INPUTS,
    assert_names_argument,
    backward_inputs,
    kernel_scalars,
    valid_attention_args,
    valid_rope_args,
)
from helpers.op_inputs import (
    LAYOUTS,
    LOW_AND_SINGLE_PRECISION,
    OP_SETTINGS,
    TOLERANCES,
    assert_matches,
    attention_problems,
    cu_seqlens_of,
    generator_from,
    make_token_head_tensors,
    non_finite_attention_problems,
    random_coords,
    rope_problems,
    seeds,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmv.ops import has_kernel, packed_attention, reference, rope3d, rope_freqs

CUDA_KERNEL_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)
TENSOR_CORE_HEAD_DIMS = (32, 64, 128)

# Hypothesis examples per test on the emulator, where the plain kernels run a fiber per thread.
EMULATED_EXAMPLES = {"tensor_cores": 6, "plain": 3, "non_finite": 4, "rope3d": 8}


@dataclass(frozen=True)
class Backend:
    """Where the CUDA kernels run: ``device`` holds their tensors ("cuda", or "cpu" on the emulator,
    whose dispatch mode routes mmv's ops on CPU tensors to the emulated CUDA kernels)."""

    name: str
    device: str

    @property
    def emulated(self) -> bool:
        return self.device == "cpu"

    def holds(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device

    def put(self, t, requires_grad: bool = False):
        """A copy of a CPU tensor on the backend's device with the same sizes, strides and storage
        offset (``Tensor.cuda`` would make a strided view contiguous); anything else unchanged. With
        ``requires_grad`` the copy is a view of a leaf, so gradients can be taken with respect to it."""
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return t
        base = (t._base if t._base is not None else t).detach()
        storage = base.to(self.device, copy=True).requires_grad_(requires_grad)
        return storage.as_strided(t.size(), t.stride(), t.storage_offset() - base.storage_offset())

    def kernel(self, op_name: str):
        """The CUDA kernel of ``mmv::op_name`` alone: no autograd, no Python wrapper."""
        if self.emulated:
            op = getattr(torch.ops.mmv_emulated, op_name).default
            return lambda *args: emulated_cuda.run_guarded(op, *args)
        op = getattr(torch.ops.mmv, op_name).default
        return lambda *args: op.redispatch(CUDA_KERNEL_ONLY, *args)

    def has_kernel(self, op_name: str) -> bool:
        if self.emulated:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"mmv_emulated::{op_name}", "CPU")
        return has_kernel(op_name, "cuda")

    def synchronize(self) -> None:
        if not self.emulated:
            torch.cuda.synchronize()

    def outside(self):
        """A context in which mmv's ops on CPU tensors run the CPU kernels again."""
        if self.emulated:
            return torch.utils._python_dispatch._disable_current_modes()
        return contextlib.nullcontext()

    def examples(self, kind: str):
        """The hypothesis settings of a property test of ``kind`` on this backend."""
        health = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
        if self.emulated:
            return settings(OP_SETTINGS, max_examples=EMULATED_EXAMPLES[kind], suppress_health_check=health)
        return settings(OP_SETTINGS, suppress_health_check=health)


CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
)
EMULATED = tuple(
    pytest.param(
        f"emulated:{device}",
        marks=pytest.mark.skipif(not emulated_cuda.supported(), reason="the CUDA emulator needs x86-64 Linux"),
    )
    for device in emulated_cuda.DEVICES
)
BACKENDS = (CUDA, *EMULATED)


def slow_when_emulated(param):
    """A backend parameter, marked ``slow_emulation`` when it is the emulator."""
    if param.values[0] == "cuda":
        return param
    return pytest.param(*param.values, marks=[*param.marks, pytest.mark.slow_emulation], id=param.id)


# A large case: quick on a GPU, minutes on the emulator.
SLOW_WHEN_EMULATED = tuple(slow_when_emulated(p) for p in BACKENDS)


def with_backends(cases, slow_on_emulator=lambda *case: False):
    """(backend, *case) parameters for @pytest.mark.parametrize(..., indirect=["backend"])."""
    params = []
    for case in cases:
        for backend in BACKENDS:
            param = pytest.param(*backend.values, *case, marks=backend.marks)
            params.append(slow_when_emulated(param) if slow_on_emulator(*case) else param)
    return params


def runs_the_plain_kernel(dtype, head_dim, *_):
    return dtype not in TENSOR_CORE_DTYPES or head_dim not in TENSOR_CORE_HEAD_DIMS


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "cuda":
        yield Backend(name, "cuda")
        return
    with emulated_cuda.emulated(name.split(":")[1]):
        yield Backend(name, "cpu")


def device_tensors(backend, count, num_tokens, num_heads, head_dim, dtype, layout, generator, requires_grad=False):
    """``make_token_head_tensors`` on the backend's device, layouts kept."""
    tensors = make_token_head_tensors(count, num_tokens, num_heads, head_dim, dtype, layout, generator)
    return tuple(backend.put(t, requires_grad) for t in tensors)


def forward(q, k, v, cu_seqlens, max_seqlen=-1, scale=None, validate=True, deterministic=False):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.mmv.packed_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale, validate, deterministic)


def gradients(q, k, v, cu_seqlens, grad_out, scale=None, deterministic=False, validate=True):
    out = packed_attention(q, k, v, cu_seqlens, scale=scale, deterministic=deterministic, validate=validate)
    return out, torch.autograd.grad(out, (q, k, v), grad_out)


def on_backend(backend, problem):
    """An ``attention_problems`` draw with q, k, v on the backend's device (layouts kept), requiring
    gradients."""
    return (*(backend.put(t, requires_grad=True) for t in problem[:3]), *problem[3:])


tensor_core_problems = attention_problems(st.sampled_from(TENSOR_CORE_DTYPES), st.sampled_from(TENSOR_CORE_HEAD_DIMS))
# The plain kernel: float32 at any head_dim, and low precision at head dims the tensor cores leave out.
plain_problems = st.one_of(
    attention_problems(st.just(torch.float32), st.integers(1, 256)),
    attention_problems(st.sampled_from(TENSOR_CORE_DTYPES), st.integers(1, 256).filter(lambda d: d not in (32, 64, 128))),
)


def check_against_reference(backend, q, k, v, lengths, scale, seed, deterministic=False):
    cu_seqlens = cu_seqlens_of(lengths)
    grad_out = backend.put(torch.randn(q.shape, generator=generator_from(seed)).to(q.dtype))
    out, grads = gradients(q, k, v, backend.put(cu_seqlens), grad_out, scale, deterministic)
    cpu = [t.detach().cpu() for t in (q, k, v)]
    expected_out, _ = reference_float64(*cpu, cu_seqlens, scale)
    expected_grads = reference_gradients_float64(grad_out.cpu(), *cpu, cu_seqlens, scale, out.detach().cpu())
    tolerance = TOLERANCES[q.dtype]
    assert out.dtype == q.dtype and backend.holds(out)
    assert_matches(out.cpu(), expected_out, tolerance.forward, "out")
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert grad.dtype == q.dtype
        assert_matches(grad.cpu(), expected, tolerance.backward, name)


def test_kernels_are_registered(backend):
    for op_name in ("rope3d", "packed_attention_fwd", "packed_attention_bwd"):
        assert backend.has_kernel(op_name), f"no CUDA kernel for mmv::{op_name}"


# packed_attention: agreement with the reference on every path ------------------------------------


def test_tensor_core_path_matches_float64_reference(backend):
    @backend.examples("tensor_cores")
    @given(problem=tensor_core_problems, seed=seeds, deterministic=st.booleans())
    def check(problem, seed, deterministic):
        check_against_reference(backend, *on_backend(backend, problem), seed, deterministic)

    check()


def test_plain_path_matches_float64_reference(backend):
    @backend.examples("plain")
    @given(problem=plain_problems, seed=seeds)
    def check(problem, seed):
        check_against_reference(backend, *on_backend(backend, problem), seed)

    check()


def test_non_finite_inputs_propagate_as_in_the_reference(backend):
    @backend.examples("non_finite")
    @given(
        problem=st.one_of(
            non_finite_attention_problems(st.sampled_from(TENSOR_CORE_DTYPES), st.sampled_from(TENSOR_CORE_HEAD_DIMS)),
            non_finite_attention_problems(st.sampled_from([torch.float32, torch.float64]), st.integers(1, 256)),
        ),
        seed=seeds,
        deterministic=st.booleans(),
    )
    def check(problem, seed, deterministic):
        # Both paths: the tensor cores' online softmax (fmaxf skips a NaN score) and the plain kernel's.
        check_non_finite_against_reference(*(backend.put(t) for t in problem[:3]), *problem[3:], seed, deterministic)

    check()


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_a_nan_poisons_what_it_touches_in_its_sequence_and_head(backend, where):
    lengths = [5, 15]
    tensors = make_token_head_tensors(3, 20, 2, 64, torch.bfloat16, "contiguous", generator_from(7))
    q, k, v = (backend.put(t) for t in tensors)
    {"q": q, "k": k, "v": v}[where][0, 0, 0] = float("nan")
    check_non_finite_against_reference(q, k, v, lengths, None, 8)


@pytest.mark.parametrize(
    "backend, dtype, head_dim",
    with_backends(
        [(torch.bfloat16, d) for d in (32, 64, 128, 1, 48, 80, 256)]
        + [(torch.float16, d) for d in (32, 64, 128, 96)]
        + [(torch.float32, d) for d in (64, 7)]
        + [(torch.float64, 64)],
        slow_on_emulator=runs_the_plain_kernel,
    ),
    indirect=["backend"],
)
@pytest.mark.parametrize("deterministic", [False, True])
def test_every_path_on_a_skewed_batch(backend, dtype, head_dim, deterministic):
    # Sequences across every tile boundary (64, 128), empty and single-token ones, one long one.
    lengths = [197, 0, 1, 64, 65, 128, 0, 450]
    q, k, v = device_tensors(backend, 3, sum(lengths), 3, head_dim, dtype, "qkv", generator_from(11), requires_grad=True)
    check_against_reference(backend, q, k, v, lengths, None, seed=12, deterministic=deterministic)


@pytest.mark.parametrize("backend", SLOW_WHEN_EMULATED, indirect=True)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_standard_mixed_workload(backend, dtype):
    # 24 chest X-rays of 197 tokens and 2 CT crops of 1729, H = 6, D = 64, as views of one qkv tensor.
    lengths = [197] * 12 + [1729] + [197] * 12 + [1729]
    q, k, v = device_tensors(backend, 3, sum(lengths), 6, 64, dtype, "qkv", generator_from(13), requires_grad=True)
    check_against_reference(backend, q, k, v, lengths, None, seed=14)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", TENSOR_CORE_DTYPES)
def test_strided_and_misaligned_views(backend, layout, dtype):
    # padded_rows starts no row on a 16-byte boundary: the tensor-core path copies such operands.
    lengths = [70, 3, 130]
    q, k, v = device_tensors(backend, 3, sum(lengths), 2, 64, dtype, layout, generator_from(15), requires_grad=True)
    before = [t.detach().clone() for t in (q, k, v)]
    check_against_reference(backend, q, k, v, lengths, None, seed=16)
    for original, tensor in zip(before, (q, k, v)):
        assert torch.equal(original, tensor.detach())


def test_gradcheck_float64(backend):
    generator = generator_from(17)
    lengths = [3, 0, 5, 1]
    q, k, v = (
        backend.put(t).requires_grad_(True)
        for t in torch.randn(3, sum(lengths), 2, 6, dtype=torch.float64, generator=generator)
    )
    cu_seqlens = backend.put(cu_seqlens_of(lengths))
    assert torch.autograd.gradcheck(lambda q, k, v: packed_attention(q, k, v, cu_seqlens), (q, k, v))


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 64)])
def test_lse_is_the_logsumexp_of_each_tokens_scores(backend, dtype, head_dim):
    lengths = [100, 1, 0, 260]
    q, k, v = device_tensors(backend, 3, sum(lengths), 2, head_dim, dtype, "contiguous", generator_from(18))
    _, lse = forward(q, k, v, backend.put(cu_seqlens_of(lengths)))
    _, expected = reference_float64(q.cpu(), k.cpu(), v.cpu(), cu_seqlens_of(lengths), head_dim**-0.5)
    assert lse.dtype == torch.float32 and lse.shape == (2, sum(lengths))
    assert_matches(lse.cpu(), expected, TOLERANCES[torch.float32].forward, "lse")


@pytest.mark.parametrize(
    "backend, dtype, head_dim",
    with_backends([(torch.bfloat16, 64), (torch.float16, 32), (torch.float32, 64)], runs_the_plain_kernel),
    indirect=["backend"],
)
def test_matches_the_cpu_kernel(backend, dtype, head_dim):
    if not has_kernel("packed_attention_fwd", "cpu"):
        pytest.skip("mmv was built without the CPU attention kernel")
    lengths = [197, 0, 1, 300]
    q, k, v = make_token_head_tensors(3, sum(lengths), 2, head_dim, dtype, "qkv", generator_from(19))
    grad_out = torch.randn(q.shape, generator=generator_from(20)).to(dtype)
    cu_seqlens = cu_seqlens_of(lengths)
    results = {}
    for device in ("cpu", "cuda"):
        if device == "cuda":
            leaves = [backend.put(t, True) for t in (q, k, v)]
            out, grads = gradients(*leaves, backend.put(cu_seqlens), backend.put(grad_out))
        else:
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            with backend.outside():
                out, grads = gradients(*leaves, cu_seqlens, grad_out)
        results[device] = [t.detach().cpu() for t in (out, *grads)]
    tolerance = TOLERANCES[dtype]
    for name, on_gpu, on_cpu in zip(("out", "dq", "dk", "dv"), results["cuda"], results["cpu"]):
        assert_matches(on_gpu, on_cpu, tolerance.forward if name == "out" else tolerance.backward, name)


# packed_attention: sequences of length 0 and 1, empty batches, many sequences --------------------


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 16)])
def test_single_token_sequences_attend_only_to_themselves(backend, dtype, head_dim):
    lengths = [1, 0, 1, 1, 0]
    q, k, v = device_tensors(backend, 3, 3, 2, head_dim, dtype, "contiguous", generator_from(21), requires_grad=True)
    out, lse = forward(q, k, v, backend.put(cu_seqlens_of(lengths)))
    assert torch.equal(out, v)
    expected_lse = (q.double() * k.double()).sum(-1).transpose(0, 1) * head_dim**-0.5
    assert_matches(lse.cpu(), expected_lse.cpu(), TOLERANCES[torch.float32].forward, "lse")
    grad_out = backend.put(torch.randn(q.shape, generator=generator_from(22)).to(dtype))
    _, (dq, dk, dv) = gradients(q, k, v, backend.put(cu_seqlens_of(lengths)), grad_out)
    assert torch.equal(dv, grad_out)
    # A softmax over one key has no gradient; dP - D cancels only to rounding where the tensor cores
    # and the preprocess sum dout . v in different orders.
    assert dq.abs().max() <= 1e-4 and dk.abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("num_sequences", [0, 3])
def test_empty_batch(backend, dtype, num_sequences):
    q, k, v = (torch.empty(0, 2, 64, dtype=dtype, device=backend.device, requires_grad=True) for _ in range(3))
    cu_seqlens = backend.put(cu_seqlens_of([0] * num_sequences))
    out, lse = forward(q, k, v, cu_seqlens)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    _, (dq, dk, dv) = gradients(q, k, v, cu_seqlens, torch.empty(0, 2, 64, dtype=dtype, device=backend.device))
    assert dq.shape == dk.shape == dv.shape == (0, 2, 64)


@pytest.mark.parametrize("backend", SLOW_WHEN_EMULATED, indirect=True)
def test_more_sequences_than_the_scheduler_sorts(backend):
    # Over 4096 sequences the schedule keeps the batch's own order instead of longest first.
    lengths = torch.randint(0, 4, (5000,), generator=generator_from(23)).tolist() + [90]
    q, k, v = device_tensors(backend, 3, sum(lengths), 1, 32, torch.float16, "contiguous", generator_from(24))
    cu_seqlens = cu_seqlens_of(lengths)
    out, lse = forward(q, k, v, backend.put(cu_seqlens))
    expected_out, expected_lse = reference_float64(q.cpu(), k.cpu(), v.cpu(), cu_seqlens, 32**-0.5)
    assert_matches(out.cpu(), expected_out, TOLERANCES[torch.float16].forward, "out")
    assert_matches(lse.cpu(), expected_lse, TOLERANCES[torch.float32].forward, "lse")


# packed_attention: determinism, unchecked cu_seqlens, host synchronisation ------------------------


@pytest.mark.parametrize(
    "backend, dtype, head_dim",
    with_backends([(torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 40)], runs_the_plain_kernel),
    indirect=["backend"],
)
def test_deterministic_backward_is_bit_identical_across_runs_and_sequence_orders(backend, dtype, head_dim):
    lengths = [197, 1, 0, 520, 64, 197]
    generator = generator_from(26)
    sequences = [
        [torch.randn(length, 3, head_dim, generator=generator).to(dtype) for _ in range(4)] for length in lengths
    ]

    def per_sequence_results(order):
        q, k, v, grad_out = (backend.put(torch.cat([sequences[b][i] for b in order])) for i in range(4))
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        cu_seqlens = cu_seqlens_of([lengths[b] for b in order])
        out, grads = gradients(q, k, v, backend.put(cu_seqlens), grad_out, deterministic=True)
        bounds = cu_seqlens.tolist()
        return {b: [t[bounds[i] : bounds[i + 1]] for t in (out, *grads)] for i, b in enumerate(order)}

    natural = list(range(len(lengths)))
    first, second = per_sequence_results(natural), per_sequence_results(natural)
    shuffled = per_sequence_results(torch.randperm(len(lengths), generator=generator_from(27)).tolist())
    for b in natural:
        for name, x, y, z in zip(("out", "dq", "dk", "dv"), first[b], second[b], shuffled[b]):
            assert torch.equal(x, y), f"{name} of sequence {b} differs between runs"
            assert torch.equal(x, z), f"{name} of sequence {b} depends on the order of sequences"


@pytest.mark.parametrize("backend", SLOW_WHEN_EMULATED, indirect=True)
def test_atomic_and_deterministic_backward_agree(backend):
    lengths = [197] * 4 + [700]
    q, k, v = device_tensors(backend, 3, sum(lengths), 6, 64, torch.bfloat16, "qkv", generator_from(28), requires_grad=True)
    grad_out = backend.put(torch.randn(q.shape, generator=generator_from(29)).to(q.dtype))
    cu_seqlens = backend.put(cu_seqlens_of(lengths))
    _, atomic = gradients(q, k, v, cu_seqlens, grad_out, deterministic=False)
    _, fixed = gradients(q, k, v, cu_seqlens, grad_out, deterministic=True)
    assert torch.equal(atomic[1], fixed[1]) and torch.equal(atomic[2], fixed[2])  # dK, dV: same kernel
    assert_matches(atomic[0].cpu(), fixed[0].cpu(), TOLERANCES[torch.bfloat16].backward, "dq")


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 64), (torch.float32, 64)])
def test_unchecked_cu_seqlens_never_fault(backend, dtype, head_dim):
    # validate=False trusts cu_seqlens; garbage then gives garbage, but every access stays in bounds
    # (on the emulator, an access past any tensor fails the test).
    num_tokens = 50
    q, k, v, grad_out = device_tensors(backend, 4, num_tokens, 2, head_dim, dtype, "contiguous", generator_from(30))
    for values in ([0, 80, 20, -5, 50], [-100, 10**6], [7, 3, 60, 2**31 - 1], [0], [50, 0, 25], [0, 10, 10, 10]):
        cu_seqlens = torch.tensor(values, dtype=torch.int32, device=backend.device)
        for deterministic in (False, True):
            out, lse = forward(q, k, v, cu_seqlens, validate=False, deterministic=deterministic)
            torch.ops.mmv.packed_attention_bwd(
                grad_out, q, k, v, out, lse, cu_seqlens, -1, head_dim**-0.5, False, deterministic
            )
        backend.synchronize()
    # The device is still healthy: a valid call afterwards is right.
    lengths = [20, 30]
    out, _ = forward(q, k, v, backend.put(cu_seqlens_of(lengths)))
    expected, _ = reference_float64(q.cpu(), k.cpu(), v.cpu(), cu_seqlens_of(lengths), head_dim**-0.5)
    assert_matches(out.cpu(), expected, TOLERANCES[dtype].forward, "out")


# Host synchronisation is the CUDA runtime's: the emulator has no separate host to wait for.
@pytest.mark.parametrize("backend", [CUDA], indirect=True)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_only_validation_synchronises_with_the_host(backend, dtype):
    lengths = [197, 0, 300]
    q, k, v = device_tensors(backend, 3, sum(lengths), 2, 64, dtype, "qkv", generator_from(31), requires_grad=True)
    grad_out = backend.put(torch.randn(q.shape, generator=generator_from(32)).to(dtype))
    cu_seqlens = backend.put(cu_seqlens_of(lengths))
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for deterministic in (False, True):
            gradients(q, k, v, cu_seqlens, grad_out, deterministic=deterministic, validate=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            forward(q, k, v, cu_seqlens, validate=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# packed_attention: bad inputs, as on the CPU ------------------------------------------------------


def device_args(backend, args: dict) -> dict:
    """Valid CPU arguments, changed by a bad-input case, moved to the backend's device (layouts kept);
    tensors the case put on another device stay there."""
    return {name: backend.put(value) for name, value in args.items()}


@pytest.mark.parametrize("bad", ATTENTION_BAD_INPUTS, ids=str)
def test_packed_attention_fwd_kernel_rejects(backend, bad):
    args = device_args(backend, bad.change(valid_attention_args()))
    max_seqlen, scale = kernel_scalars(args)
    with pytest.raises(bad.error) as raised:
        backend.kernel("packed_attention_fwd")(args["q"], args["k"], args["v"], args["cu_seqlens"], max_seqlen, scale)
    assert_names_argument(raised, bad.argument)


def call_bwd_kernel(backend, args: dict):
    max_seqlen, scale = kernel_scalars(args)
    return backend.kernel("packed_attention_bwd")(
        *(args[name] for name in ("dout", "q", "k", "v", "out", "lse", "cu_seqlens")), max_seqlen, scale
    )


@pytest.mark.parametrize("bad", ATTENTION_BAD_INPUTS, ids=str)
def test_packed_attention_bwd_kernel_rejects(backend, bad):
    args = device_args(backend, backward_inputs(bad.change(valid_attention_args())))
    with pytest.raises(bad.error) as raised:
        call_bwd_kernel(backend, args)
    assert_names_argument(raised, bad.argument)


@pytest.mark.parametrize("bad", BACKWARD_BAD_INPUTS, ids=str)
def test_packed_attention_bwd_kernel_rejects_saved_tensors(backend, bad):
    args = device_args(backend, bad.change(backward_inputs(valid_attention_args())))
    with pytest.raises(bad.error) as raised:
        call_bwd_kernel(backend, args)
    assert_names_argument(raised, bad.argument)


@pytest.mark.parametrize("bad", ATTENTION_BAD_INPUTS, ids=str)
def test_packed_attention_rejects(backend, bad):
    with pytest.raises(bad.error) as raised:
        packed_attention(**device_args(backend, bad.change(valid_attention_args())))
    assert_names_argument(raised, bad.argument)


# opcheck tests mmv's registration of the CUDA op (schema, fake and autograd kernels); the emulated
# kernels are registered apart, under mmv_emulated.
@pytest.mark.parametrize("backend", [CUDA], indirect=True)
def test_opcheck(backend):
    pytest.importorskip("expecttest")  # torch.library.opcheck's test utilities need it
    lengths = [5, 0, 9]
    q, k, v = device_tensors(backend, 3, sum(lengths), 2, 64, torch.bfloat16, "qkv", generator_from(33), requires_grad=True)
    args = (q, k, v, backend.put(cu_seqlens_of(lengths)), 9, 0.125, True, False)
    torch.library.opcheck(torch.ops.mmv.packed_attention_fwd.default, args)


# rope3d -----------------------------------------------------------------------------------------


def test_rope3d_matches_float64_reference_with_gradient(backend):
    @backend.examples("rope3d")
    @given(problem=rope_problems(st.sampled_from([*LOW_AND_SINGLE_PRECISION, torch.float64])), seed=seeds)
    def check(problem, seed):
        x, coords, freqs, sections, interleaved = problem
        x_device = backend.put(x, requires_grad=True)
        out = rope3d(x_device, backend.put(coords), backend.put(freqs), sections, interleaved)
        if x.shape[0] == 0:
            assert out.shape == x.shape
            return
        expected = reference.rope3d(x.double(), coords, freqs, sections, interleaved)
        assert out.dtype == x.dtype and out.is_contiguous()
        assert_matches(out.cpu(), expected, TOLERANCES[x.dtype].forward, "rope3d output")
        grad_out = torch.randn(x.shape, generator=generator_from(seed)).to(x.dtype)
        (grad_x,) = torch.autograd.grad(out, x_device, backend.put(grad_out))
        expected_grad = reference.rope3d(grad_out.double(), coords, -freqs, sections, interleaved)
        assert_matches(grad_x.cpu(), expected_grad, TOLERANCES[x.dtype].backward, "rope3d grad_x")

    check()


def shifted_by_elements(x: torch.Tensor, shift: int) -> torch.Tensor:
    """A copy of x with x's sizes and strides whose storage starts ``shift`` elements later."""
    base = x._base if x._base is not None else x
    buffer = torch.zeros(base.numel() + shift, dtype=x.dtype)
    shifted = buffer.as_strided(x.size(), x.stride(), x.storage_offset() - base.storage_offset() + shift)
    return shifted.copy_(x)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [*LOW_AND_SINGLE_PRECISION, torch.float64])
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "base_one_element_off"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope3d_views_on_the_vector_and_element_wise_paths(backend, layout, shift, dtype, interleaved):
    # qkv and head_major views are 16-byte aligned (vector path); padded rows and a base pointer one
    # element off are not (element-wise path).
    generator = generator_from(34)
    (x,) = make_token_head_tensors(1, 40, 3, 64, dtype, layout, generator)
    x = shifted_by_elements(x, shift)
    coords = random_coords(40, generator)
    freqs = rope_freqs(64)
    out = rope3d(backend.put(x), backend.put(coords), backend.put(freqs), (12, 10, 8), interleaved)
    expected = reference.rope3d(x.double(), coords, freqs, (12, 10, 8), interleaved)
    assert_matches(out.cpu(), expected, TOLERANCES[dtype].forward, f"rope3d of a {layout} view")


@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION)
def test_rope3d_matches_the_cpu_kernel_on_the_standard_workload(backend, dtype):
    generator = generator_from(35)
    (x,) = make_token_head_tensors(1, 8186, 6, 64, dtype, "qkv", generator)
    coords = random_coords(8186, generator)
    freqs = rope_freqs(64)
    on_gpu = rope3d(backend.put(x), backend.put(coords), backend.put(freqs), (12, 10, 10))
    with backend.outside():
        on_cpu = rope3d(x, coords, freqs, (12, 10, 10))
    assert_matches(on_gpu.cpu(), on_cpu, TOLERANCES[dtype].forward, "rope3d CUDA vs CPU")


@pytest.mark.parametrize("bad", ROPE_BAD_INPUTS, ids=str)
def test_rope3d_kernel_rejects(backend, bad):
    args = device_args(backend, bad.change(valid_rope_args()))
    with pytest.raises(bad.error) as raised:
        backend.kernel("rope3d")(args["x"], args["coords"], args["freqs"], args["sections"], args["interleaved"])
    assert_names_argument(raised, bad.argument)
