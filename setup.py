"""Builds mmv._C: the CPU kernels always, the CUDA kernels when PyTorch has CUDA and nvcc is found.

Environment:
  MMV_CUDA=auto|0|1      build the CUDA kernels if possible (default) / never / or fail without them
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "9.0" or "8.0;9.0+PTX" (default: the visible GPU,
                         else 8.0;9.0)
  MAX_JOBS               parallel compile jobs
  CUDA_HOME              the CUDA toolkit; found from the nvcc on PATH when unset
"""

import glob
import os
import runpy

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME when it is imported: resolve it first (cmake/cuda_home.py
# follows an nvcc wrapper script to the real toolkit).
_cuda_home = runpy.run_path(os.path.join(ROOT, "cmake", "cuda_home.py"))["find_cuda_home"]()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _build_cuda() -> bool:
    mode = os.environ.get("MMV_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MMV_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append("this PyTorch has no CUDA")
    if CUDA_HOME is None:
        missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if missing and mode == "1":
        raise SystemExit("MMV_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return not missing


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    # -fopenmp: at::parallel_for is an inline OpenMP loop; compiled without it, it runs serially.
    # -Wno-psabi: simd.h passes 64-byte vectors between inline functions, which GCC notes at length.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp", "-Wno-psabi"]
    link_flags = ["-fopenmp"]  # resolves to the libgomp that torch has already loaded
    macros = [("MMV_PYTHON_MODULE", None)]
    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    if not _build_cuda():
        return CppExtension(
            "mmv._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for the tensor-core generations the kernels target.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    # No -std here: torch.utils.cpp_extension gives nvcc the standard it gives the C++ compiler (the one
    # PyTorch was built with). Host code compiled under two standards links two differing copies of the
    # same inline library functions: with PyTorch 2.11 (C++17) and nvcc at C++20, formatting an error
    # message crashed the process.
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "mmv._C",
        sources + _sources("csrc/cuda/*.cu"),
        define_macros=macros + [("MMV_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


class BuildExtensionInPlace(BuildExtension):
    """Keeps object files in build/temp, also for editable installs (which otherwise build in a new
    temporary folder each time), so that ninja recompiles only the sources that changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionInPlace.with_options(use_ninja=True)},
)
