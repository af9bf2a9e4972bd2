"""Self-supervised pretraining of :class:`mmv.Encoder` on mixed 2D and 3D batches (DINOv2 recipe).

One optimiser step: the EMA teacher encodes the global views of every image of a token-budget batch;
the student encodes all views at once in one pack (global views with iBOT block masks, local views
whole); the loss is DINO on CLS tokens + iBOT on masked patch tokens + KoLeo on the global views' CLS
(:mod:`mmv.ssl.objective`). AdamW with a warm-up + cosine learning rate, a cosine weight-decay schedule, gradient clipping and
gradient accumulation; bf16 autocast on GPU; DDP under ``torchrun`` (gloo on CPU, NCCL on GPU).

A run directory holds ``config.toml``-equivalent ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step), ``loss.png``, ``checkpoints/step_*.pt`` (the last K; :mod:`mmv.train.checkpoint`) and, at the end, ``encoder/`` (the
teacher's encoder with the run's preprocessing, loadable with :meth:`mmv.Encoder.from_pretrained`).
Resuming restores model, teacher, optimiser, loss centres, the data position and every random
generator, so a resumed run continues with exactly the losses of one that was never interrupted.

Resuming takes the newest checkpoint that verifies (its checksum, its structure, the names and shapes of
its weights); a newer one that does not is skipped with a warning naming it. Checkpoints are written
atomically, so a bad one means the disk or someone else damaged it; the previous checkpoint is a complete
state, and since a resumed run repeats the same losses exactly, falling back costs only the steps in
between, where stopping would cost a person's attention. Only when no checkpoint verifies does resuming
raise :class:`mmv.CheckpointError`. ``metrics.jsonl`` is cut back to the resumed step, so it never holds
steps twice, and a partial last line left by a kill is dropped.

The output directory is checked for writing before any data or model is set up.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mmv.data.sampler import TokenBudgetBatchSampler
from mmv.devices import resolve_device
from mmv.files import atomic_write, check_writable
from mmv.model.checkpoint import CheckpointError
from mmv.model.encoder import Encoder
from mmv.ssl.batch import MultiCropDataset, SeededBatchSampler, SslBatch, SslCollate
from mmv.ssl.heads import DinoHead
from mmv.ssl.objective import LOSS_NAMES, SslObjective, SslStudent
from mmv.ssl.teacher import EmaTeacher
from mmv.tokenizer import Tokenizer
from mmv.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from mmv.train.config import PretrainConfig, RunSettings
from mmv.train.schedules import cosine_schedule, teacher_momentum, teacher_temperature, warmup_cosine_schedule
from mmv.train.sources import build_pretraining_sources, modality_preprocess

__all__ = ["Trainer", "pretrain", "plot_losses", "read_metrics"]


def _parameter_groups(module: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms, tokens and LayerScale."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        is_token = name.endswith(("cls_token", "register_tokens", "mask_token"))
        (no_decay if parameter.dim() < 2 or is_token else decay).append(parameter)
    return [{"params": decay, "apply_decay": True}, {"params": no_decay, "apply_decay": False, "weight_decay": 0.0}]


def _set_up_distribution(run: RunSettings) -> tuple[torch.device, int, int]:
    """Set the thread count, join the process group under ``torchrun`` (gloo on CPU, NCCL on GPU) and pick
    this process's device; returns ``(device, world_size, rank)``."""
    if run.num_threads is not None:
        torch.set_num_threads(int(run.num_threads))
    device = resolve_device(run.device, "run.device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, world_size, rank


def read_metrics(metrics_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, without a partial last line (a run killed while writing it).

    Raises:
        ValueError: naming the file and line, for a complete line that is not a JSON object.
    """
    with open(metrics_path, encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    # Every complete record ends with a newline: what follows the last one is empty or partial.
    records = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{metrics_path}: line {number} is not a metrics record ({error})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{metrics_path}: line {number} is not a metrics record (a JSON object)")
        records.append(record)
    return records


def plot_losses(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """Plot the losses of a ``metrics.jsonl`` against the step into a PNG; None when there is nothing yet."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in records]
    for name in LOSS_NAMES:
        axes[0 if name == "loss" else 1].plot(steps, [r[name] for r in records], label=name)
    axes[0].set_title("total loss")
    axes[1].set_title("terms")
    for axis in axes:
        axis.set_xlabel("step")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(out_path, lambda stream: figure.savefig(stream, dpi=100, format="png"), durable=False)
    plt.close(figure)
    return Path(out_path)


class Trainer:
    """Runs (or resumes) one pretraining run described by a :class:`PretrainConfig`.

    Args:
        config: the run's configuration.
        dataset: the images (a dataset of :class:`mmv.data.Sample`); by default built from
            ``config.data.sources``.
        resume: continue from the latest checkpoint in ``<out_dir>/checkpoints`` when there is one.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here if it is not already:
    gloo on CPU, NCCL on GPU. Only rank 0 writes files.

    Raises:
        OSError: ``run.out_dir`` cannot be written (checked before the data and the model are set up).
        CheckpointError: ``resume`` and checkpoints exist, but none of them verifies and fits this run.
    """

    def __init__(self, config: PretrainConfig, dataset=None, resume: bool = False) -> None:
        if not isinstance(config, PretrainConfig):
            raise TypeError(f"Trainer: config must be a PretrainConfig, got {type(config).__name__}")
        self.config = config
        self.device, self.world_size, self.rank = _set_up_distribution(config.run)
        self._check_output_directory()
        encoder = self._build_encoder()
        heads = self._build_heads(encoder.config.embed_dim)
        self._build_student_and_teacher(encoder, heads)
        self._build_optimizer(heads)
        self._build_data(dataset, encoder.config.patch_size)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.resumed_from: Path | None = self._resume() if resume else None

    def _check_output_directory(self) -> None:
        """Name the run's files and check that rank 0 can write them, before any data or model is set up."""
        self.out_dir = Path(self.config.run.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if self.rank == 0:
            check_writable(self.out_dir, "run.out_dir")

    def _build_encoder(self) -> Encoder:
        """The encoder, drawn first after seeding, so it starts from the weights Encoder(config) gets after this seed."""
        torch.manual_seed(self.config.run.seed + self.rank)
        encoder = Encoder(self.config.model.encoder_config())
        # Recorded with the weights (save_pretrained), so that the encoder's users preprocess as it was trained.
        encoder.preprocess = modality_preprocess(self.config.data)
        return encoder

    def _build_heads(self, embed_dim: int) -> list[DinoHead]:
        """The DINO head, and the iBOT head when ``ssl.separate_ibot_head``."""
        ssl = self.config.ssl
        return [
            DinoHead(embed_dim, ssl.num_prototypes, ssl.head_hidden_dim, ssl.head_bottleneck_dim, ssl.head_layers, ssl.head_batch_norm)
            for _ in range(2 if ssl.separate_ibot_head else 1)
        ]

    def _build_student_and_teacher(self, encoder: Encoder, heads: list[DinoHead]) -> None:
        """The student on the device, its EMA teacher, the objective, and the student under DDP when distributed."""
        self.student = SslStudent(encoder, heads[0], heads[1] if len(heads) > 1 else None).to(self.device)
        self.teacher = EmaTeacher(self.student).to(self.device)
        self.objective = SslObjective(self.config.ssl).to(self.device)
        self.model = self.student
        if self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _build_optimizer(self, heads: list[DinoHead]) -> None:
        """AdamW over the student, and the heads' last layers (frozen for ``optim.freeze_last_layer_steps``)."""
        optim = self.config.optim
        self.optimizer = torch.optim.AdamW(_parameter_groups(self.student), lr=optim.lr, betas=tuple(optim.betas))
        self.last_layer_parameters = [p for head in heads for p in head.last_layer_parameters]

    def _build_data(self, dataset, patch_size: tuple[int, int, int]) -> None:
        """The multi-crop data set, its seeded token-budget batches, and the loader that assembles them."""
        config, run = self.config, self.config.run
        if dataset is None:
            dataset = build_pretraining_sources(config.data)
        tokenizer = Tokenizer(patch_size, drop_rate=config.augment.token_drop_rate)
        self.dataset = MultiCropDataset(
            dataset, config.augment.multicrop(), tokenizer, config.augment.mask_probability, tuple(config.augment.mask_ratio)
        )
        weights = dataset.sample_weights() if hasattr(dataset, "sample_weights") else None
        batches = TokenBudgetBatchSampler(
            self.dataset.token_counts(progress=run.progress and self.rank == 0),
            config.data.max_tokens,
            window=config.data.window,
            seed=run.seed,
            weights=weights,
            max_images=config.data.max_images,
            drop_last=True,
        )
        if len(batches) == 0:
            raise ValueError("the data yields no batch per epoch: add images or lower data.max_tokens")
        self.sampler = SeededBatchSampler(batches, run.seed)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=SslCollate(),
            num_workers=config.data.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: each new epoch's iterator would otherwise draw from the global one,
            # which a resumed run must find exactly as the uninterrupted run left it.
            generator=torch.Generator().manual_seed(run.seed),
        )

    # ----------------------------------------------------------------------------------------------

    def schedules(self, step: int) -> dict[str, float]:
        """Learning rate, weight decay, teacher momentum and teacher temperature at optimiser step ``step``."""
        optim, ssl = self.config.optim, self.config.ssl
        total = optim.steps
        return {
            "lr": warmup_cosine_schedule(step, total, optim.lr, optim.min_lr, min(optim.warmup_steps, total - 1)),
            "weight_decay": cosine_schedule(step, total, *optim.weight_decay),
            "momentum": teacher_momentum(step, total, *ssl.momentum),
            "teacher_temperature": teacher_temperature(step, ssl.teacher_temperature_warmup_steps, *ssl.teacher_temperature),
        }

    def state_dict(self) -> dict[str, Any]:
        """The run's state as a training checkpoint holds it (:func:`mmv.train.checkpoint.training_state`)."""
        rng = capture_rng_state()
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        return training_state(
            step=self.step,
            epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch,
            student=self.student,
            teacher=self.teacher,
            objective=self.objective,
            optimizer=self.optimizer,
            rng_states=rng,
            config=self.config,
        )

    def _resume(self) -> Path | None:
        """Restore the newest checkpoint that verifies; returns its path (None when there is none)."""
        checkpoints = list_checkpoints(self.checkpoint_dir)
        errors = []
        for path in reversed(checkpoints):
            try:
                self._restore(path, load_checkpoint(path))
            except CheckpointError as error:
                errors.append(error)
                warnings.warn(f"cannot resume from {error}; trying the previous checkpoint", RuntimeWarning, stacklevel=3)
                continue
            return path
        if errors:
            raise CheckpointError(
                self.checkpoint_dir, f"none of its {len(errors)} checkpoints can be resumed from; the newest: {errors[0]}"
            )
        return None

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        """Check that ``state`` fits this run, then load it; CheckpointError naming ``path`` if it does not."""
        self.step, self.epoch, self.batch_in_epoch = restore_training_state(
            path,
            state,
            student=self.student,
            teacher=self.teacher,
            objective=self.objective,
            optimizer=self.optimizer,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _save(self) -> None:
        state = self.state_dict()
        if self.rank == 0:
            save_checkpoint(self.checkpoint_dir, self.step, state, self.config.run.keep_checkpoints)
            plot_losses(self.metrics_path, self.out_dir / "loss.png")
        if self.world_size > 1:
            dist.barrier()

    def _cut_metrics_to_step(self) -> None:
        """Make ``metrics.jsonl`` hold the records up to the current step only: the steps a killed run logged
        after its last checkpoint are run again, and a partial last line is dropped."""
        records = read_metrics(self.metrics_path) if self.step > 0 and self.metrics_path.is_file() else []
        text = "".join(json.dumps(record) + "\n" for record in records if record.get("step", 0) <= self.step)
        atomic_write(self.metrics_path, lambda stream: stream.write(text.encode()))

    # ----------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[SslBatch]:
        """Micro-batches from the current data position onward, epoch after epoch.

        Each one drawn moves the data position (``epoch``, ``batch_in_epoch``) on, as :meth:`train` does.
        """
        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                if batch is not None:
                    yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def _apply_schedules(self, values: dict[str, float]) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr"]
            if group["apply_decay"]:
                group["weight_decay"] = values["weight_decay"]

    def train(self, until_step: int | None = None) -> list[dict[str, float]]:
        """Train until ``optim.steps`` optimiser steps (or stop at ``until_step``, checkpointed, to be resumed);
        returns the per-step metrics of this call.

        Writes metrics, checkpoints, the loss plot and, once the run is complete, the teacher's encoder
        (rank 0).
        """
        config, run, optim = self.config, self.config.run, self.config.optim
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config.to_dict(), indent=2) + "\n"
            atomic_write(self.out_dir / "config.json", lambda stream: stream.write(text.encode()))
            self._cut_metrics_to_step()
        self.student.train()
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=_use_bf16(run.bf16, self.device))
        history: list[dict[str, float]] = []
        progress = tqdm(
            total=optim.steps, initial=self.step, desc="pretrain", disable=not (run.progress and self.rank == 0)
        )
        last_step = optim.steps if until_step is None else min(int(until_step), optim.steps)
        batches = self.batches()
        started = time.perf_counter()
        while self.step < last_step:
            values = self.schedules(self.step)
            self._apply_schedules(values)
            sums = dict.fromkeys(LOSS_NAMES, 0.0)
            tokens = 0
            for micro in range(optim.accumulation):
                batch = next(batches).to(self.device, non_blocking=True)
                final_micro = micro == optim.accumulation - 1
                sync = final_micro or self.world_size == 1
                context = self.model.no_sync() if not sync else contextlib.nullcontext()
                with context, autocast:
                    losses = self.objective(self.model, self.teacher, batch, values["teacher_temperature"])
                    (losses.loss / optim.accumulation).backward()
                # One copy to the host per micro-batch, not one per loss term.
                terms = torch.stack([getattr(losses, name).detach() for name in LOSS_NAMES]).tolist()
                for name, value in zip(LOSS_NAMES, terms):
                    sums[name] += value / optim.accumulation
                tokens += batch.student.num_tokens
            if not all(math.isfinite(v) for v in sums.values()):
                raise FloatingPointError(f"non-finite loss at step {self.step}: {sums}")
            if self.step < optim.freeze_last_layer_steps:
                for parameter in self.last_layer_parameters:
                    parameter.grad = None
            grad_norm = float("nan")
            if optim.clip_grad is not None:
                grad_norm = float(nn.utils.clip_grad_norm_(self.student.parameters(), optim.clip_grad))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.teacher.update(self.student, values["momentum"])
            self.step += 1
            elapsed = time.perf_counter() - started
            started = time.perf_counter()
            record = {"step": self.step, "epoch": self.epoch, **sums, **values, "grad_norm": grad_norm,
                      "tokens": tokens * self.world_size, "tokens_per_s": tokens * self.world_size / max(elapsed, 1e-9)}
            history.append(record)
            progress.update(1)
            progress.set_postfix(loss=f"{sums['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.rank == 0 and (self.step % run.log_every == 0 or self.step == optim.steps):
                with open(self.metrics_path, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps(record) + "\n")
            if self.step % run.checkpoint_every == 0 or self.step == last_step:
                self._save()
        progress.close()
        if self.rank == 0 and self.step == optim.steps:
            self.teacher.module.encoder.save_pretrained(self.out_dir / "encoder")
        return history


def _use_bf16(setting: bool | str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not isinstance(setting, bool):
        raise ValueError(f"run.bf16 must be true, false or 'auto', got {setting!r}")
    return setting


def pretrain(config: PretrainConfig, dataset=None, resume: bool = False) -> Path:
    """Run (or resume) pretraining; returns the directory of the saved encoder."""
    trainer = Trainer(config, dataset=dataset, resume=resume)
    trainer.train()
    return trainer.out_dir / "encoder"
