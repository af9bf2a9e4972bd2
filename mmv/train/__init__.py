"""Self-supervised pretraining: the run's configuration, its image sources, the training loop, its
checkpoints and schedules.

:mod:`mmv.train.config` reads a run config (TOML with overrides); :mod:`mmv.train.sources` builds the
images of its ``[data]`` section; :mod:`mmv.train.trainer` runs (and resumes) the loop around the DINOv2
objective of :mod:`mmv.ssl.objective`; :mod:`mmv.train.checkpoint` owns the training-checkpoint format,
and :func:`encoder_from_checkpoint` reads an encoder out of one; :mod:`mmv.train.schedules` holds the
schedules of the hyperparameters.
"""

from mmv.train.checkpoint import encoder_from_checkpoint
from mmv.train.config import PretrainConfig, apply_overrides, load_config
from mmv.train.trainer import Trainer, pretrain

__all__ = ["PretrainConfig", "Trainer", "apply_overrides", "encoder_from_checkpoint", "load_config", "pretrain"]
