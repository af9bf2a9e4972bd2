"""The demo: phantom data -> self-supervised pretraining of ``vit_tiny`` -> linear probes -> AUROC per finding.

1. Writes a phantom data set (:mod:`mmv.data.phantom`): one CT volume and one radiograph per phantom,
   five findings, train / val / test splits by phantom.
2. Pretrains ``vit_tiny`` on the training phantoms' CTs and radiographs together, in mixed 2D/3D
   token-budget batches, with the DINOv2 objective (:mod:`mmv.train`, :mod:`mmv.ssl.objective`).
3. Embeds every image of the phantom manifest with the pretrained (teacher) encoder and with the same
   encoder before pretraining (its random initialisation), as ``mmv embed`` does: one embed run for both
   encoders, each image read once (:func:`mmv.eval.embed.run_embed_encoders`), a feature table each.
4. Probes each modality and encoder as ``mmv probe --protocol manifest --array cls patch_mean --modality
   TAG`` does (:func:`mmv.eval.commands.run_probe`): a linear probe on the CLS and mean patch tokens side
   by side, fitted on the training split (strength chosen on val), per-finding and macro AUROC on the test
   split with bootstrap intervals; then the difference between the two encoders with a paired bootstrap
   interval (:func:`mmv.eval.commands.compare_probe_runs`).

``run_demo(out_dir)`` writes ``demo_results.json``, ``demo_results.md`` and ``demo_auroc.png`` into
``out_dir``, besides the phantoms, the pretraining run, the feature tables (``features/ssl``,
``features/random``) and the probe runs' reports (``probes/ssl``, ``probes/random``), and returns the results.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mmv.data.dataset_spec import DatasetSpec
from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY
from mmv.data.phantom import MANIFEST_NAME, PHANTOM_FINDINGS, PhantomSettings, write_phantom_dataset
from mmv.eval.commands import ProbeRun, compare_probe_runs, run_probe
from mmv.eval.embed import ARRAY_NAMES, run_embed_encoders
from mmv.eval.report import plot_auroc_comparison
from mmv.model.encoder import Encoder
from mmv.train.config import PretrainConfig, apply_overrides
from mmv.train.sources import build_pretraining_sources, modality_preprocess
from mmv.train.trainer import Trainer

__all__ = ["DemoSettings", "demo_config", "initial_encoder", "run_demo"]

MODALITIES = {"xray": XRAY_MODALITY, "ct": CT_MODALITY}
ENCODERS = {"ssl": "pretrained", "random": "random init"}
# Bootstrap replicates behind every interval the demo reports.
_BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; the defaults finish within ten minutes on a two-core CPU.

    Attributes:
        num_phantoms: phantoms written (each gives one CT and one radiograph).
        seed: seed of the phantoms, the initialisation, the data order and the probes.
        steps: pretraining optimiser steps.
        max_tokens: student tokens per batch.
        lr: peak learning rate.
        ct_spacing: CT voxel size in mm (phantoms are generated at it, so no resampling is needed).
        xray_spacing: radiograph pixel size in mm.
        threads: torch threads. Fixed by default because the figures depend on it: another thread count
            sums in another order, and a few hundred training steps carry that into other AUROCs. Two, the
            cores of the machines the demo is sized for: on an idle one they pretrain 1.6 times as fast as one
            thread. On a machine that is busy with other work, ``threads=1`` is quicker (two threads then
            wait for each other), with figures of its own. None chooses the cores left free by other
            processes (at least one), so the figures may follow the load. The processor's own code paths are
            pinned by the ``mmv demo`` command (:func:`mmv.numerics.pin_cpu_numerics`); pretraining runs in
            float32.
        overrides: ``section.key=value`` changes of the pretraining config (TOML values, as ``mmv pretrain
            --set`` takes them), applied last, e.g. ``("run.seed=1", "ssl.teacher_temperature=[0.04, 0.04]")``:
            variants of the recipe on the same phantoms. ``run.seed`` also seeds the random-init baseline.
    """

    num_phantoms: int = 1000
    seed: int = 0
    steps: int = 200
    max_tokens: int = 2000
    lr: float = 2e-3
    ct_spacing: float = 5.0
    xray_spacing: float = 2.5
    threads: int | None = 2
    overrides: tuple[str, ...] = ()


def demo_config(settings: DemoSettings, manifest: Path, out_dir: Path) -> PretrainConfig:
    """The pretraining configuration of the demo: ``vit_tiny`` on the training phantoms."""
    spacing = settings.ct_spacing
    recipe = {
        # LayerScale starts the residual branches at 1e-5 for long runs of large models; a few hundred
        # steps of a small one learn faster without it (as DINO's ViT-S did).
        "model": {"preset": "vit_tiny", "options": {"drop_path_rate": 0.0, "layer_scale_init": None}},
        "data": {
            "sources": [{"kind": "manifest", "path": str(manifest), "id_column": "id", "split": "train"}],
            "ct_spacing": [spacing, spacing, spacing],
            "xray_spacing": settings.xray_spacing,
            "max_tokens": settings.max_tokens,
            "window": 64,
        },
        "augment": {
            "num_global": 2,
            "num_local": 2,
            # Small views (36 tokens per global radiograph view, 27 per global CT view) put about twice
            # as many images into a step's token budget as 128 px / 64^3 views: Sinkhorn-Knopp spreads
            # a larger batch over the prototypes, and the same time buys more epochs.
            "global_size_2d": [96, 96],
            "global_size_3d": [48, 48, 48],
            "local_size_2d": [32, 32],
            "local_size_3d": [32, 32, 32],
            # Global views of most of the chest agree with each other from the first step, which is
            # what lets the teacher's targets, and so the student, settle on the image's content.
            "global_scale": [0.7, 1.0],
            "local_scale": [0.2, 0.5],
            # No contrast or brightness jitter: intensities are already normalised per image (CT by a
            # fixed HU window, radiographs by percentiles), and the level of the lungs against the rest
            # is what shows emphysema, effusion and consolidation (in short runs, jitter lowered the
            # radiograph probes).
            "contrast": [1.0, 1.0],
            "brightness": [0.0, 0.0],
            "blur_probability": 0.3,
            "blur_sigma_mm": [1.0, 6.0],
        },
        "ssl": {
            "num_prototypes": 64,
            "head_hidden_dim": 512,
            "head_bottleneck_dim": 128,
            "head_batch_norm": True,
            "normalisation": "sinkhorn",
            # Sharp targets from the first step: a short run cannot wait for a warm-up out of the
            # near-uniform targets that a warmer teacher gives on an untrained encoder.
            "teacher_temperature": [0.02, 0.02],
            "teacher_temperature_warmup_steps": settings.steps // 3,
            "momentum": [0.97, 1.0],
        },
        "optim": {
            "steps": settings.steps,
            "lr": settings.lr,
            "min_lr": settings.lr / 100,
            "warmup_steps": max(1, settings.steps // 10),
            "freeze_last_layer_steps": max(1, settings.steps // 20),
        },
        "run": {
            "out_dir": str(out_dir),
            "seed": settings.seed,
            "device": "cpu",
            "log_every": 5,
            "checkpoint_every": max(1, settings.steps // 2),
            "keep_checkpoints": 1,
            "num_threads": settings.threads,
            # float32: bfloat16 products run on AMX tiles on some processors and on AVX512-BF16 on others,
            # which round differently, so the figures would follow the processor (see mmv.numerics).
            "bf16": False,
        },
    }
    return PretrainConfig.from_dict(apply_overrides(recipe, settings.overrides))


def initial_encoder(config: PretrainConfig) -> Encoder:
    """The encoder a pretraining run of ``config`` starts from: the demo's random-init baseline.

    :class:`mmv.train.Trainer` seeds torch with ``run.seed`` and draws its encoder first, so this is the
    same initialisation, weight for weight. Its :attr:`~mmv.Encoder.preprocess` is the run's, as the
    pretrained encoder records it, so that both see the images alike.
    """
    torch.manual_seed(config.run.seed)
    encoder = Encoder(config.model.encoder_config())
    encoder.preprocess = modality_preprocess(config.data)
    return encoder


def _figures(run: ProbeRun) -> dict[str, Any]:
    """What the demo reports of one probe run: per-finding and macro AUROC on the test split, with intervals."""
    evaluation = run.evaluation
    return {
        "macro_auroc": float(evaluation.macro_auroc),
        "macro_auroc_interval": [float(v) for v in evaluation.interval.macro],
        "per_finding": {name: float(value) for name, value in zip(evaluation.label_names, evaluation.auroc)},
        "per_finding_interval": {
            name: [float(v) for v in interval]
            for name, interval in zip(evaluation.label_names, evaluation.interval.per_label)
        },
        "test_rows": len(run.data.test),
    }


def _number(value: float, signed: bool = False) -> str:
    return "n/a" if math.isnan(value) else (f"{value:+.3f}" if signed else f"{value:.3f}")


def _markdown(results: dict[str, Any]) -> str:
    lines = ["| finding | X-ray pretrained | X-ray random | CT pretrained | CT random |", "|---|---|---|---|---|"]
    for name in list(PHANTOM_FINDINGS) + ["macro AUROC (95 % CI)"]:
        cells = []
        for modality in MODALITIES:
            for encoder in ("ssl", "random"):
                detail = results["detail"][modality][encoder]
                if name in PHANTOM_FINDINGS:
                    cells.append(_number(detail["per_finding"][name]))
                else:
                    low, high = detail["macro_auroc_interval"]
                    cells.append(f"{_number(detail['macro_auroc'])} ({_number(low)}-{_number(high)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for modality, label in (("xray", "X-ray"), ("ct", "CT")):
        difference = results["difference"][modality]
        low, high = difference["interval"]
        lines.append(
            f"{label}: pretrained minus random, macro AUROC {_number(difference['macro_auroc'], True)} "
            f"(95 % paired bootstrap interval {_number(low, True)} to {_number(high, True)})"
        )
    return "\n".join(lines) + "\n"


def _free_cores() -> int:
    cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def run_demo(out_dir: str | Path = "mmv-demo", settings: DemoSettings | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole demo into ``out_dir`` and return its results (also written as JSON, markdown, PNG).

    The phantoms are written by one spawned process per core (:func:`mmv.data.phantom.write_phantom_dataset`),
    so a script that calls this must start from an ``if __name__ == "__main__":`` guard.
    """
    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = settings.threads if settings.threads is not None else _free_cores()
    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # The config first: a bad override fails before minutes of phantom writing.
    config = demo_config(settings, out_dir / "phantoms" / MANIFEST_NAME, out_dir / "pretrain")
    phantom_settings = PhantomSettings(ct_spacing=(settings.ct_spacing,) * 3, xray_spacing=settings.xray_spacing)
    # Phantoms are the same for any number of writing processes: they use every core.
    manifest = write_phantom_dataset(
        out_dir / "phantoms", settings.num_phantoms, settings.seed, phantom_settings, progress, workers=None
    )
    timings["phantoms_s"] = time.perf_counter() - started

    mark = time.perf_counter()
    random_encoder = initial_encoder(config)
    trainer = Trainer(config, dataset=build_pretraining_sources(config.data))
    trainer.train()
    timings["pretrain_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    # From here the demo takes the product's path: `mmv embed` of the phantom manifest with both encoders
    # (the pretraining run's, and the random initialisation with the run's preprocessing), then `mmv probe`.
    embedded = run_embed_encoders(
        {"ssl": trainer.out_dir, "random": random_encoder},
        DatasetSpec("manifest", manifest, id_column="id"),
        out_dir / "features",
        device="cpu",
        resume=False,
        progress=progress,
    )
    timings["features_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    detail: dict[str, dict[str, Any]] = {}
    difference: dict[str, dict[str, Any]] = {}
    probes: dict[str, dict[str, ProbeRun]] = {}
    for modality, tag in MODALITIES.items():
        probes[modality] = {
            name: run_probe(
                embedded[name].directory, "manifest", out_dir / "probes" / name, array=ARRAY_NAMES, modality=tag,
                seed=settings.seed, num_resamples=_BOOTSTRAP_RESAMPLES, progress=False,
            )
            for name in ENCODERS
        }
        detail[modality] = {name: _figures(run) for name, run in probes[modality].items()}
        difference[modality] = compare_probe_runs(
            probes[modality]["ssl"], probes[modality]["random"], seed=settings.seed, num_resamples=_BOOTSTRAP_RESAMPLES
        )
    timings["probe_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    results = {
        modality: {name: detail[modality][name]["macro_auroc"] for name in ("ssl", "random")} for modality in MODALITIES
    }
    results.update(
        {"detail": detail, "difference": difference, "settings": asdict(settings), "threads": threads, "timings": timings, "findings": list(PHANTOM_FINDINGS)}
    )
    (out_dir / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "demo_results.md").write_text(_markdown(results), encoding="utf-8")
    plot_auroc_comparison(
        out_dir / "demo_auroc.png",
        {
            f"{modality}: linear probe AUROC, test split": {
                ENCODERS[name]: run.evaluation for name, run in probes[modality].items()
            }
            for modality in MODALITIES
        },
    )
    return results


def format_results(results: dict[str, Any]) -> str:
    """The per-finding and macro AUROC table as text, X-ray and CT side by side, and the paired differences."""
    return _markdown(results)
