"""A tiny in-memory data set and run config shared by the trainer tests (and their worker script)."""

from __future__ import annotations

import torch

from mmv.data.datasets import Sample
from mmv.image import Image
from mmv.train.config import PretrainConfig


class SyntheticImages(torch.utils.data.Dataset):
    """Radiograph-like 2D images and CT-like volumes with smooth random content, fixed by ``seed``."""

    def __init__(self, count: int = 12, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.samples = []
        for index in range(count):
            if index % 3 == 2:
                pixels, spacing, modality = torch.rand(1, 1, 6, 8, 8, generator=generator), (4.0, 4.0, 4.0), "CT"
                pixels = torch.nn.functional.interpolate(pixels, size=(24, 32, 32), mode="trilinear")[0, 0]
            else:
                pixels, spacing, modality = torch.rand(1, 1, 8, 8, generator=generator), (2.0, 2.0), "DX"
                pixels = torch.nn.functional.interpolate(pixels, size=(48, 48), mode="bilinear")[0, 0]
            image = Image(pixels * 2 - 1, spacing, modality)
            self.samples.append(Sample(image=image, labels=torch.zeros(0), id=f"s{index}", modality=modality))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def tiny_config(out_dir, steps: int = 6, **sections) -> PretrainConfig:
    """A run of a 2-block, 32-wide encoder on 16-token views: a few seconds per run."""
    values = {
        "model": {"preset": "vit_tiny", "options": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": [4, 8, 8], "drop_path_rate": 0.2}},
        "data": {"max_tokens": 600, "window": 32},
        "augment": {
            "num_local": 2, "global_size_2d": [32, 32], "global_size_3d": [16, 32, 32], "local_size_2d": [16, 16],
            "local_size_3d": [8, 16, 16], "token_drop_rate": 0.1,
        },
        "ssl": {"num_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16, "teacher_temperature_warmup_steps": 3},
        "optim": {"steps": steps, "warmup_steps": 2, "accumulation": 2, "freeze_last_layer_steps": 1},
        "run": {
            "out_dir": str(out_dir), "checkpoint_every": 2, "log_every": 1, "progress": False, "device": "cpu",
            "bf16": False, "num_threads": 1,
        },
    }
    for name, changes in sections.items():
        values[name].update(changes)
    return PretrainConfig.from_dict(values)
