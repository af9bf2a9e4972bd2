"""Supervised ceiling of the demo: ``vit_tiny`` trained with the phantoms' labels, X-ray and CT separately.

``mmv demo`` probes frozen features of a self-supervised encoder and of its random initialisation. This
script measures what the same encoder reaches when it is trained with the labels themselves, on the same
phantoms and the same preprocessing, so that the demo's figures can be read against both ends: random
features below, supervised training above.

Recipe, one model per modality (X-ray, CT):

- data: the demo's phantom set (:class:`mmv.demo.DemoSettings`: count, seed, spacings), written with
  :func:`mmv.data.phantom.write_phantom_dataset` unless ``--data`` names a phantom folder to use as it is;
  images preprocessed as the demo's pretraining and probes see them (the
  :attr:`~mmv.Encoder.preprocess` of :func:`mmv.demo.initial_encoder`);
- model: the demo's random-init encoder (:func:`mmv.demo.initial_encoder`, weight for weight), CLS token
  and mean patch token side by side into one linear layer with one output per finding;
- training: the training split only, batches of ``--batch-size`` whole images packed with
  :func:`mmv.packing.pack`, in a seeded shuffled order epoch after epoch; binary cross-entropy on the
  logits; AdamW (weight decay ``--weight-decay``, torch's default 0.01) under a one-cycle schedule
  (:class:`torch.optim.lr_scheduler.OneCycleLR` with its defaults: 30 % rising, cosine) peaking at ``--lr``; no
  augmentation, no early stopping: the model after the last step is the one measured (the validation
  split is not used);
- measure: per-finding and macro AUROC of the logits on the test split, with percentile bootstrap
  intervals (:mod:`mmv.eval.metrics`).

Float32 throughout (no autocast) on a fixed number of torch threads (the demo's, ``--threads``), with
the CPU libraries' code paths pinned as ``mmv demo`` pins them (:func:`mmv.numerics.pin_cpu_numerics`)
and seeded initialisation and data order, so that the same seed gives the same figures.

    python benchmarks/supervised_ceiling.py --json benchmarks/out/supervised_ceiling.json \\
        --plot benchmarks/out/supervised_ceiling.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.data.phantom import DESCRIPTION_NAME, MANIFEST_NAME, PHANTOM_FINDINGS, PhantomSettings, phantom_manifest, write_phantom_dataset
from mmv.demo import DemoSettings, demo_config, initial_encoder
from mmv.eval.metrics import auroc, bootstrap_auroc, macro_auroc
from mmv.model.encoder import Encoder
from mmv.numerics import pin_cpu_numerics
from mmv.packing import pack
from mmv.tokenizer import TokenizedImage

MODALITIES = {"xray": XRAY_MODALITY, "ct": CT_MODALITY}
LABELS = {"xray": "X-ray", "ct": "CT"}
DEFAULT_PHANTOMS = Path("benchmarks/out/phantoms")


class SupervisedModel(nn.Module):
    """An encoder with one linear layer on its CLS token and mean patch token, side by side."""

    def __init__(self, encoder: Encoder, num_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(2 * encoder.config.embed_dim, num_outputs)

    def forward(self, items: Sequence[TokenizedImage]) -> torch.Tensor:
        out = self.encoder(pack(items))
        return self.head(torch.cat((out.cls, out.pooled), dim=1))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def phantom_folder(data: str | None, settings: DemoSettings) -> Path:
    """The manifest of the phantom set: ``data`` as it is, or the demo's set written (once) by default."""
    if data is not None:
        manifest = Path(data) / MANIFEST_NAME
        if not manifest.is_file():
            raise SystemExit(f"--data: {data} holds no {MANIFEST_NAME} (a folder written by mmv demo or mmv phantom)")
        return manifest
    phantoms = PhantomSettings(ct_spacing=(settings.ct_spacing,) * 3, xray_spacing=settings.xray_spacing)
    return write_phantom_dataset(DEFAULT_PHANTOMS, settings.num_phantoms, settings.seed, phantoms, workers=None)


def load_split(dataset, tokenizer, desc: str) -> tuple[list[TokenizedImage], torch.Tensor]:
    """The tokenised images and the ``(N, L)`` labels of every image of ``dataset``, read once."""
    items, labels = [], []
    for row in tqdm(range(len(dataset)), desc=desc, leave=False):
        sample = dataset[row]
        items.append(tokenizer(sample.image))
        labels.append(sample.labels)
    return items, torch.stack(labels).float()


def batch_order(num_items: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` batches of item indices: each epoch a new shuffle cut into full batches (the last,
    partial one left out, so that no batch holds an image twice)."""
    if batch_size > num_items:
        raise ValueError(f"--batch-size must be at most the {num_items} training images, got {batch_size}")
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(num_items, generator=generator).tolist()
        batches.extend(order[start : start + batch_size] for start in range(0, num_items - batch_size + 1, batch_size))
    return batches[:steps]


def train(
    model: SupervisedModel, items: list[TokenizedImage], labels: torch.Tensor, args: argparse.Namespace, desc: str
) -> list[float]:
    """Train ``model`` in place; returns the mean training loss of every ``--log-every`` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps)
    loss_function = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, window = [], []
    bar = tqdm(batch_order(len(items), args.batch_size, args.steps, generator), desc=desc)
    for batch in bar:
        loss = loss_function(model([items[i] for i in batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if len(window) == args.log_every:
            losses.append(float(np.mean(window)))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            window = []
    if window:
        losses.append(float(np.mean(window)))
    return losses


@torch.no_grad()
def test_scores(model: SupervisedModel, items: list[TokenizedImage], batch_size: int) -> np.ndarray:
    model.eval()
    scores = [model(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
    return torch.cat(scores).numpy().astype(np.float64)


def measure(scores: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Per-finding and macro AUROC with their bootstrap intervals, as the demo's JSON gives them."""
    interval = bootstrap_auroc(scores, labels, seed=seed)
    return {
        "macro_auroc": float(macro_auroc(scores, labels)),
        "macro_auroc_interval": [float(v) for v in interval.macro],
        "per_finding": {name: float(v) for name, v in zip(PHANTOM_FINDINGS, auroc(scores, labels))},
        "per_finding_interval": {name: [float(v) for v in pair] for name, pair in zip(PHANTOM_FINDINGS, interval.per_label)},
        "confidence": interval.confidence,
        "bootstrap_resamples": interval.num_resamples,
    }


def run_modality(modality: str, dataset, config, args: argparse.Namespace) -> dict:
    splits = {
        split: dataset.in_splits(split).subset(lambda record: record.modality == MODALITIES[modality])
        for split in ("train", "test")
    }
    encoder = initial_encoder(config)
    # Drawn right after the encoder from the same seeded stream: the head is the same for every run too.
    model = SupervisedModel(encoder, len(PHANTOM_FINDINGS))
    started = time.perf_counter()
    train_items, train_labels = load_split(splits["train"], encoder.tokenizer, f"{LABELS[modality]} train images")
    losses = train(model, train_items, train_labels, args, f"{LABELS[modality]} supervised")
    del train_items
    test_items, test_labels = load_split(splits["test"], encoder.tokenizer, f"{LABELS[modality]} test images")
    scores = test_scores(model, test_items, args.batch_size)
    figures = measure(scores, test_labels.numpy().astype(np.float64), args.seed)
    figures.update(
        {
            "train_rows": len(splits["train"]),
            "test_rows": len(splits["test"]),
            "epochs": args.steps * args.batch_size / len(splits["train"]),
            "train_loss_every_log_steps": losses,
            "seconds": time.perf_counter() - started,
        }
    )
    return figures


def table(results: dict) -> str:
    modalities = list(results["detail"])
    lines = [
        "| finding | " + " | ".join(f"{LABELS[m]} supervised" for m in modalities) + " |",
        "|---|" + "---|" * len(modalities),
    ]
    for name in PHANTOM_FINDINGS:
        lines.append(f"| {name} | " + " | ".join(f"{results['detail'][m]['per_finding'][name]:.3f}" for m in modalities) + " |")
    cells = []
    for m in modalities:
        detail = results["detail"][m]
        low, high = detail["macro_auroc_interval"]
        cells.append(f"{detail['macro_auroc']:.3f} ({low:.3f}-{high:.3f})")
    lines.append("| macro AUROC (95 % CI) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(PHANTOM_FINDINGS) + ["macro"]
    positions = np.arange(len(names))
    modalities = list(results["detail"])
    width = 0.8 / len(modalities)
    figure, axis = plt.subplots(figsize=(8, 4))
    for k, modality in enumerate(modalities):
        detail = results["detail"][modality]
        values = np.array([detail["per_finding"][n] for n in PHANTOM_FINDINGS] + [detail["macro_auroc"]])
        intervals = np.array([detail["per_finding_interval"][n] for n in PHANTOM_FINDINGS] + [detail["macro_auroc_interval"]])
        # Whiskers: the 95 % bootstrap interval over the test phantoms.
        whiskers = np.clip(np.stack((values - intervals[:, 0], intervals[:, 1] - values)), 0.0, None)
        offset = (k - (len(modalities) - 1) / 2) * width
        axis.bar(positions + offset, values, width=width, yerr=whiskers, capsize=3, label=LABELS[modality])
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xticks(positions, names, rotation=30, ha="right")
    axis.set_ylim(0.3, 1.0)
    axis.set_title(
        f"supervised vit_tiny, {results['steps']} steps: test AUROC (95 % CI), seed {results['settings']['seed']}",
        fontsize=10,
    )
    axis.legend(loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help=f"a phantom folder to use as it is (default: the demo's set, written to {DEFAULT_PHANTOMS})")
    parser.add_argument("--modalities", nargs="+", choices=list(MODALITIES), default=list(MODALITIES))
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the demo's seed: phantoms, initialisation, data order, bootstrap")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads (default: the demo's)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (torch's default)")
    parser.add_argument("--log-every", type=int, default=20, help="steps per recorded mean training loss")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a bar plot of the results here (PNG)")
    args = parser.parse_args()
    # Before the first tensor operation, as in mmv demo: the figures then follow no processor (mmv.numerics).
    try:
        pinned = pin_cpu_numerics()
    except RuntimeError as error:
        warnings.warn(f"{error}; running unpinned, the figures may differ on another processor", RuntimeWarning)
        pinned = {}
    for name in ("steps", "batch_size", "log_every", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    settings = DemoSettings(seed=args.seed, threads=args.threads)
    manifest = phantom_folder(args.data, settings)
    config = demo_config(settings, manifest, manifest.parent / "unused-pretrain")
    # The demo's preprocessing, which its initial encoder carries.
    dataset = phantom_manifest(manifest, transform=initial_encoder(config).preprocess)
    detail = {modality: run_modality(modality, dataset, config, args) for modality in args.modalities}

    description = manifest.parent / DESCRIPTION_NAME
    results = {
        **{modality: detail[modality]["macro_auroc"] for modality in detail},
        "detail": detail,
        "findings": list(PHANTOM_FINDINGS),
        "phantoms": json.loads(description.read_text()) if description.is_file() else str(manifest),
        "settings": {"seed": args.seed, "preset": config.model.preset},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": "OneCycleLR, torch's defaults",
        "threads": torch.get_num_threads(),
        "precision": "float32",
        "pinned_environment": pinned,
        "machine": cpu_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "total_s": time.perf_counter() - started,
    }
    print(f"supervised vit_tiny, {args.steps} steps of {args.batch_size} images, seed {args.seed}, "
          f"{results['threads']} threads, {results['machine']}, {results['total_s']:.0f} s")
    print(table(results), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
