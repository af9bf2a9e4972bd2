"""Embedding throughput (images/s): ``mmv embed`` against a per-image loop, X-ray and CT separately.

Workload: a phantom data set (:mod:`mmv.data.phantom`, default settings: CT volumes of 80 x 90 x 90
voxels at 4 mm stored as ``.nii.gz``, radiographs of 160 x 180 pixels at 2 mm stored as 16-bit PNG),
embedded by a freshly initialised encoder (``vit_small`` by default). Every image is read from its file,
preprocessed (CT windowed and kept at 4 mm: 5 x 6 x 6 = 180 tokens; X-rays resized to a 224-pixel short
side: 14 x 16 = 224 tokens), tokenised and encoded, and its CLS and mean patch token kept.

- ``mmv embed``: :func:`mmv.eval.embed.run_embed` into a new feature table: token-budget batches of
  ``--max-tokens`` patch tokens, packed attention, ``--num-workers`` loader workers. Its images/s is
  the encoding pass's (token counting, reading, preprocessing, tokenising, encoding, writing rows);
  the whole call (loading the weights, hashing them, copying the finished table) is reported too.
- baseline ``per-image loop``: what a user writes without the loader: for each image, read and
  preprocess it with the same dataset and preprocessing, then call the encoder on it alone
  (``encoder([image])``) under ``torch.inference_mode``, in the main process.
- for reference, ``read + preprocess`` alone (the same loop without the encoder), the ceiling the
  loader sets.

The first image of each kind is read once untimed (ITK's first read loads its readers). Each case runs
``--repeats`` times, interleaved; the median is reported, with ratios against the baseline of the same
run. A GPU is used when present (``--device``).

    python benchmarks/bench_embed.py --json benchmarks/out/bench_embed.json --plot benchmarks/out/bench_embed.png
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmv.data.dataset_spec import DatasetSpec, open_dataset
from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.data.phantom import PhantomSettings, write_phantom_dataset
from mmv.eval.embed import run_embed
from mmv.eval.encoders import embed_preprocess
from mmv.model.encoder import Encoder

CT_SPACING_MM = 4.0
XRAY_SHORT_SIDE = 224
MODALITIES = {"X-ray": XRAY_MODALITY, "CT": CT_MODALITY}


def split_manifest(manifest: Path) -> dict[str, Path]:
    """One manifest per modality next to ``manifest``."""
    with open(manifest, newline="") as stream:
        reader = csv.DictReader(stream)
        header, rows = reader.fieldnames, list(reader)
    paths = {}
    for name, tag in MODALITIES.items():
        path = manifest.with_name(f"manifest_{tag.lower()}.csv")
        with open(path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, header)
            writer.writeheader()
            writer.writerows(row for row in rows if row["modality"] == tag)
        paths[name] = path
    return paths


def per_image_loop(encoder: Encoder, dataset, device: torch.device, bf16: bool, encode: bool = True) -> float:
    """Seconds to read, preprocess and (when ``encode``) encode every image one at a time."""
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    started = time.perf_counter()
    for index in range(len(dataset)):
        image = dataset[index].image
        if encode:
            with torch.inference_mode(), autocast:
                out = encoder([image])
            out.cls.float().cpu()
    return time.perf_counter() - started


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = ("mmv embed", "per-image loop", "read + preprocess")
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.25
    for offset, case in enumerate(cases):
        values = [results[modality][case] for modality in MODALITIES]
        positions = [i + (offset - 1) * width for i in range(len(MODALITIES))]
        bars = axis.bar(positions, values, width=width, label=case)
        axis.bar_label(bars, fmt="%.2f", fontsize=8)
    axis.set_xticks(range(len(MODALITIES)), list(MODALITIES))
    # Reading alone is an order of magnitude faster than encoding: a log axis shows both.
    axis.set_yscale("log")
    axis.set_ylabel("images / s (log scale)")
    axis.set_title(title, fontsize=10)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit_small")
    parser.add_argument("--phantoms", type=int, default=8, help="phantoms (each one CT and one radiograph)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in both cases")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--data-dir", help="where the phantoms are written (default: a temporary directory)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(args.data_dir or Path(scratch) / "phantoms")
        manifest = write_phantom_dataset(data_dir, args.phantoms, seed=0, settings=PhantomSettings())
        manifests = split_manifest(manifest)
        preprocess = {"ct_spacing": (CT_SPACING_MM,) * 3, "xray_short_side": XRAY_SHORT_SIDE}
        torch.manual_seed(0)
        encoder = Encoder.from_preset(args.preset).to(device).eval()
        datasets = {
            name: open_dataset(DatasetSpec("manifest", path), transform=embed_preprocess(**preprocess))
            for name, path in manifests.items()
        }
        for dataset in datasets.values():
            per_image_loop(encoder, torch.utils.data.Subset(dataset, [0]), device, args.bf16)

        times = {name: {"mmv embed": [], "mmv embed call": [], "per-image loop": [], "read + preprocess": []}
                 for name in MODALITIES}
        for repeat in range(args.repeats):
            for name, path in manifests.items():
                started = time.perf_counter()
                run = run_embed(
                    encoder, DatasetSpec("manifest", path), Path(scratch) / f"features_{repeat}_{name}",
                    max_tokens=args.max_tokens, num_workers=args.num_workers, device=device, bf16=args.bf16,
                    progress=False, **preprocess,
                )
                times[name]["mmv embed call"].append(time.perf_counter() - started)
                times[name]["mmv embed"].append(run.seconds)
                times[name]["per-image loop"].append(per_image_loop(encoder, datasets[name], device, args.bf16))
                times[name]["read + preprocess"].append(
                    per_image_loop(encoder, datasets[name], device, args.bf16, encode=False)
                )
        tokens = {
            name: sum(dataset.token_counts(encoder.config.patch_size, progress=False)) / len(dataset)
            for name, dataset in datasets.items()
        }

    results = {
        name: {case: args.phantoms / statistics.median(seconds) for case, seconds in cases.items()}
        for name, cases in times.items()
    }
    machine = machine_name(device)
    precision = "bf16 autocast" if args.bf16 else "float32"
    title = f"{args.preset} embedding, {args.phantoms} phantoms per modality, {precision}, {machine}"
    print(title)
    print(f"{'modality':<8}{'case':<20}{'images/s':>10}{'vs per-image loop':>20}")
    for name, cases in results.items():
        for case, value in cases.items():
            print(f"{name:<8}{case:<20}{value:>10.2f}{value / cases['per-image loop']:>20.2f}")
        print(f"{'':<8}(mean patch tokens per image: {tokens[name]:.0f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "date": datetime.date.today().isoformat(), "machine": machine, "preset": args.preset,
            "phantoms": args.phantoms, "repeats": args.repeats, "max_tokens": args.max_tokens,
            "num_workers": args.num_workers, "precision": precision, "tokens_per_image": tokens,
            "images_per_s": results, "seconds": times,
        }
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(results, Path(args.plot), title)


if __name__ == "__main__":
    main()
