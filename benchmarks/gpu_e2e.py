"""A short end-to-end pass of mmv on one device: the ``e2e`` stage of ``benchmarks/gpu_check.sh``.

Three checks, each printed as one line of a table (and written to ``--json``):

- ``encoder``: ``mmv.Encoder`` (``vit_small``, random weights of a fixed seed) on the mixed workload
  (24 radiographs of 224 x 224 pixels and 2 CT volumes of 192^3 voxels, 8,186 tokens in one packed
  batch) on the device, in float32 and under bfloat16 autocast, against the same weights in float32 on
  the CPU: the largest difference of the CLS and pooled features relative to their largest magnitude,
  and the lowest cosine similarity of one image's features.
- ``pretrain``: a few steps of the self-supervised objective (the demo's recipe, ``vit_tiny``) on
  phantoms under bfloat16 autocast: every loss finite, and the mean loss of the last steps below that of
  the first.
- ``embed``: ``mmv embed``'s run (:func:`mmv.eval.run_embed`) over a manifest of phantoms with the
  encoder that pretraining saved, on the device and on the CPU: the largest feature difference.

The GPU machine has no ITK, so the images are made in memory: the manifest names files that do not
exist, and the readers of :mod:`mmv.data.datasets` are replaced, for this process only, by a lookup of
the generated images. Everything after the reader (preprocessing, tokeniser, batching, encoder,
feature table) is the product's own path.

    python benchmarks/gpu_e2e.py --json out/e2e.json             # on the GPU
    python benchmarks/gpu_e2e.py --device cpu --steps 12        # checks the script itself on the CPU
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mmv
import mmv.data.datasets as datasets_module
from mmv.data import ImageInfo
from mmv.data.dataset_spec import DatasetSpec
from mmv.data.phantom import PHANTOM_FINDINGS, PhantomSettings, generate_phantom, radiograph
from mmv.demo import DemoSettings, demo_config
from mmv.eval import read_feature_table
from mmv.eval.embed import run_embed
from mmv.train import Trainer

XRAY_SIDE, CT_SIDE = 224, 192
NUM_XRAYS, NUM_CTS = 24, 2
# Limits of each check: float32 on two devices differs by summation order only; bfloat16 autocast
# rounds every matrix product's inputs to 8 bits.
ENCODER_LIMITS = {"float32": (1e-3, 0.9999), "bf16 autocast": (6e-2, 0.99)}
EMBED_LIMIT = 1e-3


def mixed_images(seed: int) -> list[mmv.Image]:
    generator = torch.Generator().manual_seed(seed)
    xrays = [
        mmv.Image(torch.rand(XRAY_SIDE, XRAY_SIDE, generator=generator), spacing=(1.6, 1.6), modality="DX")
        for _ in range(NUM_XRAYS)
    ]
    cts = [
        mmv.Image(torch.rand(CT_SIDE, CT_SIDE, CT_SIDE, generator=generator), spacing=(1.5, 1.0, 1.0), modality="CT")
        for _ in range(NUM_CTS)
    ]
    return xrays + cts


def feature_agreement(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(largest |difference| / largest |expected|, lowest per-row cosine similarity)."""
    actual, expected = actual.double().cpu(), expected.double()
    relative = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    cosine = float(torch.nn.functional.cosine_similarity(actual, expected, dim=1).min())
    return relative, cosine


def check_encoder(device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    encoder = mmv.Encoder.from_preset("vit_small").eval()
    images = mixed_images(seed=1)
    with torch.no_grad():
        expected = encoder(images)
        expected = torch.cat([expected.cls, expected.pooled], dim=1)
    encoder = encoder.to(device)
    rows = []
    for name, autocast in (("float32", False), ("bf16 autocast", True)):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = encoder(images)
            actual = torch.cat([out.cls, out.pooled], dim=1).float()
        relative, cosine = feature_agreement(actual, expected)
        max_relative, min_cosine = ENCODER_LIMITS[name]
        rows.append(
            {
                "check": f"encoder {name}",
                "ok": math.isfinite(relative) and relative <= max_relative and cosine >= min_cosine,
                "figures": f"max rel diff {relative:.2e} (<= {max_relative:g}), min cosine {cosine:.6f} (>= {min_cosine})",
                "relative": relative,
                "cosine": cosine,
            }
        )
    return rows


class InMemoryImages:
    """Stands in for the files of a manifest: the readers of mmv.data.datasets look images up here."""

    def __init__(self) -> None:
        self.images: dict[str, mmv.Image] = {}

    def read_image(self, path, *args, **kwargs) -> mmv.Image:
        return self.images[str(path)]

    def read_image_info(self, path, *args, **kwargs) -> ImageInfo:
        image = self.images[str(path)]
        return ImageInfo(tuple(image.pixels.shape), tuple(image.spacing), image.modality)

    def install(self) -> None:
        datasets_module.read_image = self.read_image
        datasets_module.read_image_info = self.read_image_info


def write_phantom_manifest(directory: Path, count: int, images: InMemoryImages) -> Path:
    """A manifest of ``count`` phantoms (a CT and a radiograph each), all in the train split."""
    settings = PhantomSettings(ct_spacing=(5.0, 5.0, 5.0), xray_spacing=2.5)
    manifest = directory / "manifest.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "modality", "id", "group", "split", *PHANTOM_FINDINGS])
        for index in range(count):
            phantom = generate_phantom(index, seed=0, settings=settings)
            pixels, spacing = radiograph(phantom, spacing=settings.xray_spacing, seed=0)
            findings = [int(phantom.findings[name]) for name in PHANTOM_FINDINGS]
            for modality, image in (
                ("CT", mmv.Image(torch.from_numpy(phantom.hu), spacing=phantom.spacing, modality="CT")),
                ("DX", mmv.Image(torch.from_numpy(pixels), spacing=spacing, modality="DX")),
            ):
                relative = f"{modality.lower()}/phantom_{index:05d}"
                images.images[str(directory / relative)] = image
                writer.writerow([relative, modality, f"{relative}", f"phantom_{index:05d}", "train", *findings])
    return manifest


def check_pretrain(device: torch.device, manifest: Path, out_dir: Path, steps: int) -> tuple[dict, Path]:
    config = demo_config(
        DemoSettings(steps=steps, threads=None, overrides=(f"run.device={device.type}", "run.bf16=true", "run.progress=false")),
        manifest,
        out_dir,
    )
    trainer = Trainer(config)
    history = trainer.train()
    losses = [record["loss"] for record in history]
    window = max(1, len(losses) // 4)
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    finite = all(math.isfinite(loss) for loss in losses)
    row = {
        "check": "pretrain bf16 autocast",
        "ok": finite and len(losses) == steps and last < first,
        "figures": f"{len(losses)} steps, all finite: {finite}; mean loss of the first {window} {first:.4f}, "
        f"of the last {window} {last:.4f}",
        "losses": losses,
    }
    return row, out_dir / "encoder"


def check_embed(device: torch.device, encoder_dir: Path, manifest: Path, out_dir: Path) -> dict:
    spec = DatasetSpec(kind="manifest", path=manifest)
    features = {}
    seconds = {}
    for name, where in (("device", device), ("cpu", torch.device("cpu"))):
        started = time.perf_counter()
        run = run_embed(encoder_dir, spec, out_dir / name, device=where, progress=False, resume=False)
        seconds[name] = time.perf_counter() - started
        features[name] = torch.from_numpy(np.array(read_feature_table(run.directory).features))
    relative, cosine = feature_agreement(features["device"], features["cpu"])
    return {
        "check": "mmv embed",
        "ok": math.isfinite(relative) and relative <= EMBED_LIMIT,
        "figures": f"{features['device'].shape[0]} images; max rel diff to the CPU {relative:.2e} (<= {EMBED_LIMIT:g}), "
        f"min cosine {cosine:.6f}; {seconds['device']:.1f} s on {device.type}, {seconds['cpu']:.1f} s on cpu",
        "relative": relative,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    parser.add_argument("--steps", type=int, default=30, help="pretraining steps (default: 30)")
    parser.add_argument("--phantoms", type=int, default=24, help="phantoms for pretraining and embedding (default: 24)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: pass --device cpu to check the script itself", file=sys.stderr)
        return 2

    rows = []
    started = time.perf_counter()
    rows.extend(check_encoder(device))
    images = InMemoryImages()
    images.install()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        manifest = write_phantom_manifest(scratch, args.phantoms, images)
        pretrain_row, encoder_dir = check_pretrain(device, manifest, scratch / "run", args.steps)
        rows.append(pretrain_row)
        if encoder_dir.is_dir():  # saved once every step has run
            rows.append(check_embed(device, encoder_dir, manifest, scratch / "features"))

    print(f"end-to-end on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {time.perf_counter() - started:.0f} s")
    for row in rows:
        print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['check']:<24} {row['figures']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": str(device), "torch": torch.__version__, "checks": rows}, indent=2))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
