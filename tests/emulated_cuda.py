"""The CUDA kernels of csrc/cuda on the CPU: builds the test-only extension mmv_emulated and routes
mmv's ops to it.

mmv_emulated compiles the unmodified kernel sources as C++ with csrc/cuda/emulation/cuda_emulation.h
forced in front (the SIMT emulator of csrc/cuda/emulation/runtime.cpp), together with the planted-bug
kernels of tests/cuda/planted_bugs.cu. Its ops, ``torch.ops.mmv_emulated.*``, take CPU tensors and run
the CUDA host code and kernels with CPU memory standing in for device memory. The build is cached in
build/emulated; nothing of it is installed.

The C++ compiler drops ``__launch_bounds__``; where nvcc is found, it compiles the same sources to PTX
(build/emulated/ptx, alongside the C++ build) and the emulator is handed each kernel's bound from it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import platform
import re
import runpy
import shlex
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "csrc" / "cuda" / "emulation"
BUILD = ROOT / "build" / "emulated"
TEST_KERNELS = (Path(__file__).resolve().parent / "cuda" / "planted_bugs.cu",)
KERNEL_SOURCES = (*sorted((ROOT / "csrc" / "cuda").glob("*.cu")), *TEST_KERNELS)
PTX = BUILD / "ptx"
DEVICES = ("H100", "A100")
OP_NAMES = ("rope3d", "packed_attention_fwd", "packed_attention_bwd")
CPU_KERNEL_ONLY = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def supported() -> bool:
    """The emulator's context switch is written for x86-64 Linux."""
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


@functools.cache
def nvcc() -> Path | None:
    """The nvcc of the toolkit that setup.py builds the CUDA kernels with (cmake/cuda_home.py), or None."""
    home = runpy.run_path(str(ROOT / "cmake" / "cuda_home.py"))["find_cuda_home"]()
    compiler = Path(home) / "bin" / "nvcc" if home else None
    return compiler if compiler is not None and compiler.is_file() else None


def launch_bounds_unavailable() -> str | None:
    """Why the emulator does not check the kernels' ``__launch_bounds__``; None when it does."""
    if nvcc() is None:
        return ("nvcc was not found (set CUDA_HOME or put nvcc on PATH): nothing evaluates the kernels' "
                "__launch_bounds__")
    return None


@functools.cache
def load() -> None:
    """Builds (once, then only when a source changed) and loads mmv_emulated, and hands it the kernels'
    launch bounds where nvcc is found."""
    from torch.utils.cpp_extension import load as load_extension

    BUILD.mkdir(parents=True, exist_ok=True)
    # Test kernels are CUDA sources: a .cpp that includes each keeps the compiler in C++ mode.
    wrappers = []
    for kernel in TEST_KERNELS:
        wrapper = BUILD / f"{kernel.stem}_emulated.cpp"
        _write_if_changed(wrapper, f'#include "{kernel}"\n')
        wrappers.append(str(wrapper))
    sources = [str(EMULATION / name) for name in ("runtime.cpp", "ops.cpp", "packed_attention_fwd.cpp",
                                                   "packed_attention_bwd.cpp", "rope3d.cpp")]
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    ptx_build = _start_ptx_build(nvcc()) if nvcc() is not None else None
    try:
        load_extension(
            name="mmv_emulated",
            sources=sources + wrappers,
            extra_cflags=["-O2", "-fno-extern-tls-init", "-include", str(EMULATION / "cuda_emulation.h")],
            extra_include_paths=[str(EMULATION / "include")],
            build_directory=str(BUILD),
            is_python_module=False,
            verbose=False,
        )
    except BaseException:
        if ptx_build is not None:
            ptx_build.terminate()
            ptx_build.wait()
        raise
    if ptx_build is not None:
        rows = _finish_ptx_build(ptx_build)
        torch.ops.mmv_emulated.set_launch_bounds([entry for entry, _ in rows], [bound for _, bound in rows])


def _write_if_changed(path: Path, text: str) -> None:
    """Writes text to path unless it holds it already (ninja rebuilds what is newer than its output)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _ptx_of(source: Path) -> Path:
    return PTX / "_".join(source.relative_to(ROOT).with_suffix(".ptx").parts)


def _start_ptx_build(compiler: Path) -> subprocess.Popen:
    """Starts ninja on the PTX of every kernel source, compiled with the real build's flags for
    compute_80 (the emulator compiles the kernels' __CUDA_ARCH__ 800 branches); a source is compiled again
    when it or a header it includes changed. The PTX is read only for the kernels' bounds."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    PTX.mkdir(parents=True, exist_ok=True)

    def command_word(word: str) -> str:
        return shlex.quote(word).replace("$", "$$")

    def build_path(path: Path) -> str:
        return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

    # The C++ standard torch.utils.cpp_extension compiles the emulator (and setup.py the kernels) with.
    flags = ["-ptx", "-arch=compute_80", "-std=c++20", *COMMON_NVCC_FLAGS, *(f"-I{p}" for p in include_paths())]
    lines = [
        "rule ptx",
        f"  command = {' '.join(command_word(w) for w in [str(compiler), *flags])} -MD -MF $out.d $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = PTX $in",
    ]
    lines += [f"build {build_path(_ptx_of(source))}: ptx {build_path(source)}" for source in KERNEL_SOURCES]
    _write_if_changed(PTX / "build.ninja", "\n".join(lines) + "\n")
    with open(PTX / "ninja.log", "w") as log:
        return subprocess.Popen(["ninja", "-C", str(PTX), "-j", os.environ["MAX_JOBS"]], stdout=log,
                                stderr=subprocess.STDOUT)


def _finish_ptx_build(build: subprocess.Popen) -> list[tuple[str, int]]:
    """Waits for the PTX build; each kernel's mangled .entry name and launch bound, source by source. A
    name two sources share keeps both rows, so that set_launch_bounds sees bounds that disagree."""
    if build.wait() != 0:
        raise RuntimeError("nvcc could not compile the CUDA kernel sources to PTX, which the emulator reads "
                           "their __launch_bounds__ from:\n" + (PTX / "ninja.log").read_text()[-8000:])
    return [row for source in KERNEL_SOURCES for row in launch_bounds(_ptx_of(source).read_text()).items()]


ENTRY = re.compile(r"(?:\.visible\s+|\.weak\s+)?\.entry\s+([^\s(]+)")
MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")


def launch_bounds(ptx: str) -> dict[str, int]:
    """The most threads per block of each kernel of a PTX module that has a bound: ``__launch_bounds__(n)``
    becomes the directive ``.maxntid n, 1, 1`` between the ``.entry``'s parameters and its body (the
    product of the extents is the limit)."""
    bounds = {}
    kernel = None
    for line in ptx.splitlines():
        line = line.strip()
        entry = ENTRY.match(line)
        if entry:
            kernel = entry.group(1)
        elif kernel is not None and (maxntid := MAXNTID.match(line)):
            bounds[kernel] = math.prod(int(extent) for extent in maxntid.groups() if extent)
        elif line.startswith("{"):
            kernel = None
    return bounds


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
