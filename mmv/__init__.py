"""mmv: one Vision Transformer for 2D chest X-rays and 3D chest CT over packed token sequences.

The names below are imported on first use, so that importing ``mmv`` (and running ``mmv --help``) does
not import torch: ``mmv.Encoder`` and ``from mmv import Encoder`` work as usual.
"""

import importlib

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "ops": "mmv.ops",
    "Image": "mmv.image",
    "Encoder": "mmv.model",
    "EncoderConfig": "mmv.model",
    "EncoderOutput": "mmv.model",
    "CheckpointError": "mmv.model",
    "PackedBatch": "mmv.packing",
    "pack": "mmv.packing",
    "unpack": "mmv.packing",
    "Tokenizer": "mmv.tokenizer",
    "TokenizedImage": "mmv.tokenizer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmv' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
