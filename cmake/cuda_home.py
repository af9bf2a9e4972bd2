"""Print the root of the CUDA toolkit that `nvcc` belongs to.

Some machines put a small shell script named nvcc on PATH that execs the real compiler elsewhere.
PyTorch then guesses CUDA_HOME as the script's parent folder, which holds no libcudart, and linking
fails. This follows the script to the compiler it runs. setup.py imports it; CMake runs it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys


def _exec_target(script: str) -> str | None:
    """The nvcc a wrapper script execs, or None if the file is not such a script."""
    try:
        with open(script, "rb") as f:
            head = f.read(8192)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for line in head.decode("utf-8", "replace").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words[:1] == ["exec"]:
            for word in words[1:]:
                if os.path.basename(word) == "nvcc" and os.path.isfile(word):
                    return word
    return None


def find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH if set, else the toolkit root of the nvcc on PATH, else None."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    for _ in range(8):  # wrappers may chain; stop at the first real binary
        nvcc = os.path.realpath(nvcc)
        target = _exec_target(nvcc)
        if target is None:
            break
        nvcc = target
    return os.path.dirname(os.path.dirname(nvcc))


if __name__ == "__main__":
    home = find_cuda_home()
    if home is None:
        sys.exit("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    print(home)
