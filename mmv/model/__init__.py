"""The encoder: a ViT over packed 2D and 3D token sequences, its configs and its checkpoints."""

from mmv.model.checkpoint import CheckpointError
from mmv.model.config import PRESETS, EncoderConfig
from mmv.model.encoder import Encoder, EncoderOutput, MissingPreprocessWarning

__all__ = ["Encoder", "EncoderConfig", "EncoderOutput", "CheckpointError", "MissingPreprocessWarning", "PRESETS"]
