"""Whether mmv's compiled kernels can run an op on a device, and the fallback warning when not."""

from __future__ import annotations

import functools
import warnings

import torch

try:
    from mmv import _C  # noqa: F401  (importing it registers torch.ops.mmv.*)

    EXTENSION_ERROR: ImportError | None = None
except ImportError as error:  # a source checkout that was never built
    EXTENSION_ERROR = error

_OP_NAMES = ("rope3d", "packed_attention_fwd", "packed_attention_bwd")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# Looked up once at import: a plain dict lookup is something torch.compile traces through, where the
# dispatcher query itself would break the graph.
_KERNELS = {
    (op, device): EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"mmv::{op}", key)
    for op in _OP_NAMES
    for device, key in _DISPATCH_KEYS.items()
}


def extension_loaded() -> bool:
    """True when the compiled extension mmv._C was imported."""
    return EXTENSION_ERROR is None


def has_kernel(op_name: str, device_type: str) -> bool:
    """True when ``torch.ops.mmv.<op_name>`` has a compiled kernel for ``device_type``."""
    return _KERNELS.get((op_name, device_type), False)


@functools.cache
def warn_fallback(op_name: str, device_type: str) -> None:
    """Warn once per (op, device) that the plain PyTorch reference runs instead of a kernel."""
    if EXTENSION_ERROR is not None:
        reason = f"mmv._C could not be imported ({EXTENSION_ERROR})"
    else:
        reason = f"mmv was built without a {device_type} kernel for it"
    warnings.warn(
        f"mmv.ops.{op_name}: {reason}; using the plain PyTorch reference on {device_type}, "
        "which is slower and materialises attention scores.",
        RuntimeWarning,
        stacklevel=3,
    )
