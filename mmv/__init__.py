"""mmv: one Vision Transformer for 2D chest X-rays and 3D chest CT over packed token sequences."""

__version__ = "0.1.0"

from mmv import ops  # noqa: E402
from mmv.image import Image  # noqa: E402
from mmv.model import CheckpointError, Encoder, EncoderConfig, EncoderOutput  # noqa: E402
from mmv.packing import PackedBatch, pack, unpack  # noqa: E402
from mmv.tokenizer import TokenizedImage, Tokenizer  # noqa: E402

__all__ = [
    "__version__",
    "ops",
    "Image",
    "Encoder",
    "EncoderConfig",
    "EncoderOutput",
    "CheckpointError",
    "PackedBatch",
    "pack",
    "unpack",
    "Tokenizer",
    "TokenizedImage",
]
