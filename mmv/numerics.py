"""Pinned CPU numerics: the same bits from the same seed and thread count on any x86-64 CPU with AVX-512.

A float32 result computed on the CPU depends on which code computed it, because each code path sums
in its own order and float32 addition is not associative. Three libraries choose their code per
processor when they first run:

- MKL, behind PyTorch's float32 matrix products (``nn.Linear`` forward and backward, the probes'
  L-BFGS): AVX-512 kernels on Intel processors, its own kernels for AMD's Zen on AMD processors.
- PyTorch's vectorised kernels (layer norm, softmax, GELU, reductions, ``grid_sample``, the optimiser):
  AVX-512 or AVX2 vectors, as ``ATEN_CPU_CAPABILITY`` or the processor allows.
- oneDNN, whose batch-reduce GEMM micro-kernels compute the tile products of mmv's CPU attention
  (``at::native::cpublas::brgemm``): the widest instruction set the processor has.

A few hundred training steps carry the last-bit differences of each step into visibly different
weights, and so into different probe AUROCs. :func:`pin_cpu_numerics` sends each down one path that
every x86-64 processor of the last decade runs alike: PyTorch's and oneDNN's AVX2 code, and MKL's
"compatible" branch of its conditional numerical reproducibility (CNR) mode, a single SSE2 code path.
MKL's AVX2 branch is about twice as fast, but MKL honours it on Intel processors only: on AMD it runs
its automatic branch, with its Zen kernels, which give other bits than the AVX2 branch for some shapes.

Left to the processor: numpy's SIMD loops and the clone of mmv's CPU kernels that the loader picks
(``csrc/cpu/simd.h``), the AVX-512 one on every processor with AVX-512 (Intel since Skylake-SP, AMD since
Zen 4); on a processor with AVX2 only they take other code, which is not checked to give the same bits.

What it does not pin, so a reproducible run must fix it too:

- bfloat16: under autocast the matrix products run on AMX tiles where the processor has them and on
  AVX512-BF16 otherwise (and mmv's attention multiplies in bfloat16 only with AMX), which round
  differently and cannot be pinned alike. Train in float32 (``run.bf16 = false``).
- the thread count (``torch.set_num_threads``): another thread count splits the sums differently.

The libraries read these settings once, when they first run a kernel, so :func:`pin_cpu_numerics` must
run before the process's first tensor operation (importing torch and mmv is fine; creating a tensor is
not). It checks what it can and raises if PyTorch had already chosen its path.
"""

from __future__ import annotations

import os

__all__ = ["PINNED_ENVIRONMENT", "pin_cpu_numerics"]

# Each library's switch to its one path.
PINNED_ENVIRONMENT = {
    # MKL's conditional numerical reproducibility, with the one branch it runs alike on Intel and AMD.
    "MKL_CBWR": "COMPATIBLE",
    # The vector width of PyTorch's own kernels.
    "ATEN_CPU_CAPABILITY": "avx2",
    # The widest instruction set oneDNN generates code for (its JIT micro-kernels, including brgemm).
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def pin_cpu_numerics() -> dict[str, str]:
    """Send MKL, PyTorch's vectorised kernels and oneDNN down one code path each, the same on every x86-64
    processor with AVX2, for this process and the processes it starts; returns the environment variables
    set (:data:`PINNED_ENVIRONMENT`).

    Call it before the first tensor operation of the process; calling it again is harmless.

    Raises:
        RuntimeError: PyTorch's kernels already run another path (a tensor operation came first), or the
            processor has no AVX2; the environment is then left as it was.
    """
    previous = {name: os.environ.get(name) for name in PINNED_ENVIRONMENT}
    os.environ.update(PINNED_ENVIRONMENT)
    import torch

    # PyTorch fixes its path at the first vectorised kernel; asking for it here fixes it to ours if none ran.
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        # Left as it was: processes started later would otherwise run other paths than this one.
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        raise RuntimeError(
            f"pin_cpu_numerics: PyTorch's CPU kernels run the {capability} path, not AVX2: a tensor operation "
            "ran before pin_cpu_numerics() (call it first), or this processor has no AVX2"
        )
    return dict(PINNED_ENVIRONMENT)
