"""Pretraining throughput (student tokens per second) of one DINOv2 step on mixed 2D/3D batches.

Each batch holds 8 radiographs (224 px at 1.5 mm -> global views of 196 tokens, local views of 36) and 2 CT
volumes (96^3 at 1.5 mm -> global views of 216 tokens, local of 27), 2 global + 4 local views each, one
pack for the student and one for the teacher. Measured in the same run:

* ``ssl_fp32``   the whole step (teacher forward, student forward + backward, AdamW, EMA) in float32;
* ``ssl_bf16``   the same step under bfloat16 autocast (on CPUs with bf16 matrix instructions, and on GPU);
* ``encoder_fp32`` the baseline: the student encoder's forward + backward alone on the same pack.

Ratios are against ``encoder_fp32``. Usage: ``python benchmarks/bench_train.py [--preset vit_small]
[--steps 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from mmv.data.datasets import Sample
from mmv.image import Image
from mmv.train import PretrainConfig, Trainer


class MixedImages(torch.utils.data.Dataset):
    def __init__(self, count: int = 40) -> None:
        generator = torch.Generator().manual_seed(0)
        self.samples = []
        for index in range(count):
            if index % 5 == 4:
                low = torch.rand(1, 1, 12, 12, 12, generator=generator)
                pixels = torch.nn.functional.interpolate(low, size=(96, 96, 96), mode="trilinear")[0, 0]
                image, modality = Image(pixels * 2 - 1, (1.5, 1.5, 1.5), "CT"), "CT"
            else:
                low = torch.rand(1, 1, 28, 28, generator=generator)
                pixels = torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear")[0, 0]
                image, modality = Image(pixels * 2 - 1, (1.5, 1.5), "DX"), "DX"
            self.samples.append(Sample(image=image, labels=torch.zeros(0), id=str(index), modality=modality))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


def _config(preset: str, steps: int, bf16: bool, device: str, out_dir: str) -> PretrainConfig:
    return PretrainConfig.from_dict({
        "model": {"preset": preset},
        "data": {"max_tokens": 5400, "max_images": 10, "window": 40},
        "augment": {
            "num_local": 4, "global_size_2d": [224, 224], "global_size_3d": [96, 96, 96], "local_size_2d": [96, 96],
            "local_size_3d": [48, 48, 48],
        },
        "optim": {"steps": steps + 1, "warmup_steps": 1},
        "run": {"out_dir": out_dir, "bf16": bf16, "device": device, "progress": False, "checkpoint_every": 10**6,
                "log_every": 10**6},
    })


def _encoder_baseline(trainer: Trainer, steps: int) -> float:
    batches = trainer.batches()
    encoder = trainer.student.encoder
    tokens, elapsed = 0, 0.0
    for step in range(steps + 1):
        batch = next(batches).to(trainer.device)
        started = time.perf_counter()
        out = encoder(batch.student)
        (out.cls.float().square().mean() + out.patch_tokens.float().square().mean()).backward()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # the first step warms up allocators and kernels
            elapsed += time.perf_counter() - started
            tokens += batch.student.num_tokens
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit_small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json")
    args = parser.parse_args()
    dataset = MixedImages()
    results = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for name, bf16 in (("ssl_fp32", False), ("ssl_bf16", True)):
            trainer = Trainer(_config(args.preset, args.steps, bf16, args.device, out_dir), dataset=dataset)
            history = trainer.train(until_step=args.steps + 1)[1:]
            results[name] = sum(r["tokens"] for r in history) / sum(r["tokens"] / r["tokens_per_s"] for r in history)
        trainer = Trainer(_config(args.preset, args.steps, False, args.device, out_dir), dataset=dataset)
        results["encoder_fp32"] = _encoder_baseline(trainer, args.steps)
    device = trainer.device
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"{args.preset} pretraining throughput on {machine} (student tokens/s, {args.steps} steps after one warm-up)")
    print(f"{'step':<14}{'tokens/s':>12}{'vs encoder_fp32':>18}")
    for name, value in results.items():
        print(f"{name:<14}{value:>12.0f}{value / results['encoder_fp32']:>18.2f}")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"preset": args.preset, "device": machine, "tokens_per_s": results}, stream, indent=2)


if __name__ == "__main__":
    main()
