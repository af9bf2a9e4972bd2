"""The CUDA kernels of csrc/cuda on the CPU: builds the test-only extension mmv_emulated and routes
mmv's ops to it.

mmv_emulated compiles the unmodified kernel sources as C++ with csrc/cuda/emulation/cuda_emulation.h
forced in front (the SIMT emulator of csrc/cuda/emulation/runtime.cpp), together with the planted-bug
kernels of tests/cuda/planted_bugs.cu. Its ops, ``torch.ops.mmv_emulated.*``, take CPU tensors and run
the CUDA host code and kernels with CPU memory standing in for device memory. The build is cached in
build/emulated; nothing of it is installed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "csrc" / "cuda" / "emulation"
BUILD = ROOT / "build" / "emulated"
TEST_KERNELS = (Path(__file__).resolve().parent / "cuda" / "planted_bugs.cu",)
DEVICES = ("H100", "A100")
OP_NAMES = ("rope3d", "packed_attention_fwd", "packed_attention_bwd")
CPU_KERNEL_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def supported() -> bool:
    """The emulator's context switch is written for x86-64 Linux."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


@functools.cache
def load() -> None:
    """Builds (once, then only when a source changed) and loads mmv_emulated."""
    from torch.utils.cpp_extension import load as load_extension

    BUILD.mkdir(parents=True, exist_ok=True)
    # Test kernels are CUDA sources: a .cpp that includes each keeps the compiler in C++ mode.
    wrappers = []
    for kernel in TEST_KERNELS:
        wrapper = BUILD / f"{kernel.stem}_emulated.cpp"
        text = f'#include "{kernel}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        wrappers.append(str(wrapper))
    sources = [str(EMULATION / name) for name in ("runtime.cpp", "ops.cpp", "packed_attention_fwd.cpp",
                                                   "packed_attention_bwd.cpp", "rope3d.cpp")]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    load_extension(
        name="mmv_emulated",
        sources=sources + wrappers,
        extra_cflags=["-O2", "-fno-extern-tls-init", "-include", str(EMULATION / "cuda_emulation.h")],
        extra_include_paths=[str(EMULATION / "include")],
        build_directory=str(BUILD),
        is_python_module=False,
        verbose=False,
    )


class EmulatedKernels(torch.utils._python_dispatch.TorchDispatchMode):
    """Within it, ``torch.ops.mmv.*`` on CPU tensors run the CUDA kernels on the emulator: autograd,
    argument checks and everything else of mmv.ops stay as they are. Inputs are copied into guarded
    memory and outputs allocated there, so that a kernel's access past any tensor is reported."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.calls = collections.Counter()  # emulated op name -> calls
        self.redirect = {
            getattr(torch.ops.mmv, name).default: getattr(torch.ops.mmv_emulated, name).default for name in OP_NAMES
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        emulated = self.redirect.get(func)
        if emulated is None:
            return func(*args, **kwargs)
        self.calls[emulated.name()] += 1
        return run_guarded(emulated, *args, **kwargs)


def run_guarded(op, *args, **kwargs):
    """``op(*args, **kwargs)`` (an OpOverload) on its CPU kernel, with tensor arguments copied into guarded memory and every tensor the
    op allocates placed there too."""
    guarded = [torch.ops.mmv_emulated.guarded_copy(a) if isinstance(a, torch.Tensor) and a.device.type == "cpu"
               else a for a in args]
    torch.ops.mmv_emulated.guard_allocations(True)
    try:
        # Straight to the CPU kernel, as a CUDA launch goes to the CUDA one whatever else is passed
        # (the kernel's own checks name a tensor on another device).
        return op.redispatch(CPU_KERNEL_ONLY, *guarded, **kwargs)
    finally:
        torch.ops.mmv_emulated.guard_allocations(False)


@contextlib.contextmanager
def emulated(device: str):
    """mmv's ops on CPU tensors run the CUDA kernels, emulated on the modelled ``device``; yields
    the EmulatedKernels mode."""
    load()
    previous = torch.ops.mmv_emulated.device()
    torch.ops.mmv_emulated.set_device(device)
    try:
        with EmulatedKernels(device) as mode:
            yield mode
    finally:
        torch.ops.mmv_emulated.set_device(previous)
