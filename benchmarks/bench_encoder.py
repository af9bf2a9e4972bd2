"""Encoder throughput: packed sequences against the same weights run as a padded batch.

Workload (docs/design.md, the standard mixed batch): 24 chest X-rays of 224 x 224 px and 2 CT crops of
192^3 voxels, cut into 16-pixel patches: 24 sequences of 196 + 1 CLS tokens and 2 of 1728 + 1.

- packed: ``mmv.Encoder`` as it is: one token stream, ``packed_attention`` within each image.
- padded: the same weights (patch embedding, prefix tokens, blocks, final norm, all public attributes
  of the encoder), but every sequence padded to the longest one: patches are embedded straight into a
  ``(B, L_max, C)`` tensor, and attention is ``torch.nn.functional.scaled_dot_product_attention`` with a
  key-padding mask, which is what a timm or MONAI ViT does with images of different sizes. Its RoPE is
  mmv's own ``rope3d`` kernel, so the comparison isolates packing from the rotary implementation.

Both run forward (under ``torch.no_grad``) and forward + backward, in float32 and under bfloat16
autocast. Throughput counts useful tokens only (patch + CLS tokens, never padding). Each case runs
``--warmup`` times untimed and ``--repeats`` times timed, packed and padded interleaved; the median is
reported. The padded output is checked against the packed output before timing.

Memory: padded forward + backward keeps activations for every padded token, about 1.4 GB per
vit_small block in float32 on this workload; ``--depth`` runs fewer blocks where that does not fit.

    python benchmarks/bench_encoder.py --json encoder.json --plot encoder.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmv.image import Image
from mmv.model.encoder import Encoder
from mmv.ops import has_kernel, rope3d
from mmv.packing import PackedBatch, pack
from mmv.tokenizer import Tokenizer

XRAY_SHAPE, XRAY_SPACING = (224, 224), (1.6, 1.6)
CT_SHAPE, CT_SPACING = (192, 192, 192), (1.5, 1.5, 1.5)


def mixed_workload(num_xrays: int, num_cts: int, patch_size, seed: int = 0) -> PackedBatch:
    generator = torch.Generator().manual_seed(seed)
    images = [Image(torch.randn(*XRAY_SHAPE, generator=generator), XRAY_SPACING, "DX") for _ in range(num_xrays)]
    images += [Image(torch.randn(*CT_SHAPE, generator=generator), CT_SPACING, "CT") for _ in range(num_cts)]
    tokenizer = Tokenizer(patch_size)
    return pack([tokenizer(image) for image in images])


class PaddedRunner:
    """Runs an :class:`Encoder`'s weights on its batch padded to ``(B, L_max, C)``, attention by SDPA."""

    def __init__(self, encoder: Encoder, batch: PackedBatch) -> None:
        self.encoder = encoder
        self.batch = batch
        num_prefix = encoder.num_prefix_tokens
        lengths = [n + num_prefix for n in batch.lengths]
        self.num_images, self.max_length = len(lengths), max(lengths)
        # The padded row of every prefix token, and of every patch token in packed order.
        starts = [b * self.max_length for b in range(self.num_images)]
        self.prefix_rows = torch.tensor([start + j for start in starts for j in range(num_prefix)], dtype=torch.int64)
        self.patch_rows = torch.tensor(
            [start + num_prefix + i for start, n in zip(starts, batch.lengths) for i in range(n)], dtype=torch.int64
        )
        valid = torch.zeros(self.num_images * self.max_length, dtype=torch.bool)
        valid[self.prefix_rows] = True
        valid[self.patch_rows] = True
        self.key_mask = valid.view(self.num_images, 1, 1, self.max_length)
        is_patch = torch.zeros(self.num_images * self.max_length)
        is_patch[self.patch_rows] = 1.0
        self.patch_weights = is_patch.view(self.num_images, self.max_length, 1)
        self.patch_counts = torch.tensor(batch.lengths, dtype=torch.float32)[:, None]

    def __call__(self):
        encoder, batch = self.encoder, self.batch
        embedded_2d, embedded_3d = encoder.patch_embed(batch.patches_2d, batch.patches_3d)
        embedded = torch.cat((embedded_2d, embedded_3d))
        prefix = encoder.cls_token
        if encoder.register_tokens is not None:
            prefix = torch.cat((prefix, encoder.register_tokens))
        prefix = prefix.to(embedded.dtype).repeat(self.num_images, 1)
        rows = torch.cat((self.patch_rows[torch.cat((batch.rows_2d, batch.rows_3d))], self.prefix_rows))
        padded = embedded.new_zeros(self.num_images * self.max_length, embedded.shape[1])
        padded = padded.index_copy(0, rows, torch.cat((embedded, prefix)))
        coords = batch.coords_mm.new_zeros(padded.shape[0], 3)
        coords = coords.index_copy(0, self.patch_rows, batch.coords_mm / encoder.config.coordinate_unit_mm)
        padded = padded.view(self.num_images, self.max_length, -1)
        for block in encoder.blocks:
            padded = self._block(block, padded, coords, encoder.rope_freqs, encoder.config.rope_sections)
        padded = encoder.norm(padded)
        num_prefix = encoder.num_prefix_tokens
        patch_tokens = padded.reshape(-1, padded.shape[-1])[self.patch_rows]
        pooled = (padded * self.patch_weights.to(padded.dtype)).sum(dim=1) / self.patch_counts.to(padded.dtype)
        return padded[:, 0], padded[:, 1:num_prefix], patch_tokens, pooled

    def _block(self, block, x, coords, freqs, sections):
        batch_size, length, dim = x.shape
        attention = block.attn
        heads, head_dim = attention.num_heads, attention.head_dim
        q, k, v = attention.qkv(block.norm1(x)).view(batch_size, length, 3, heads, head_dim).unbind(2)
        q = attention.q_norm(q).to(v.dtype)
        k = attention.k_norm(k).to(v.dtype)
        q = rope3d(q.reshape(-1, heads, head_dim), coords, freqs, sections).view(batch_size, length, heads, head_dim)
        k = rope3d(k.reshape(-1, heads, head_dim), coords, freqs, sections).view(batch_size, length, heads, head_dim)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.key_mask
        )
        x = x + block.ls1(attention.proj(out.transpose(1, 2).reshape(batch_size, length, dim)))
        return x + block.ls2(block.mlp(block.norm2(x)))


def packed_runner(encoder: Encoder, batch: PackedBatch):
    def run():
        out = encoder(batch)
        return out.cls, out.registers, out.patch_tokens, out.pooled

    return run


def one_step(run, encoder: Encoder, dtype: torch.dtype, backward: bool) -> float:
    """Seconds for one forward (and backward) pass of ``run``."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    encoder.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.set_grad_enabled(backward), autocast:
        cls, _, patch_tokens, _ = run()
        loss = cls.float().square().mean() + patch_tokens.float().square().mean()
    if backward:
        loss.backward()
    return time.perf_counter() - start


def check_padded_matches_packed(encoder, batch, padded) -> float:
    with torch.no_grad():
        packed_out = packed_runner(encoder, batch)()
        padded_out = padded()
    pairs = [(a, b) for a, b in zip(packed_out, padded_out) if a.numel()]  # registers may be empty
    difference = max((a - b).abs().max().item() for a, b in pairs)
    scale = max(a.abs().max().item() for a, _ in pairs)
    if difference > 1e-3 * scale:
        raise RuntimeError(f"the padded baseline disagrees with the packed encoder: max difference {difference}")
    return difference


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} torch threads"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["results"]
    labels = [f"{r['dtype']}\n{r['mode']}" for r in rows]
    positions = range(len(rows))
    figure, axis = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    width = 0.38
    axis.bar([p - width / 2 for p in positions], [r["packed_tokens_per_s"] for r in rows], width, label="packed (mmv)")
    axis.bar([p + width / 2 for p in positions], [r["padded_tokens_per_s"] for r in rows], width, label="padded + SDPA mask")
    for p, r in zip(positions, rows):
        axis.text(p, r["packed_tokens_per_s"], f"{r['speedup']:.1f}x", ha="center", va="bottom")
    axis.set_xticks(list(positions), labels)
    axis.set_ylabel("useful tokens / s")
    workload = results["workload"]
    axis.set_title(
        f"{results['preset']} (depth {results['depth']}) on {workload['num_xrays']} X-rays + {workload['num_cts']} CTs "
        f"({workload['useful_tokens']} useful tokens) - {results['machine']}",
        fontsize=9,
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_small")
    parser.add_argument("--depth", type=int, help="override the preset's number of blocks")
    parser.add_argument("--num-xrays", type=int, default=24)
    parser.add_argument("--num-cts", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--modes", default="forward,forward_backward", help="comma-separated: forward, forward_backward")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    chosen_dtypes = [dtypes[name] for name in args.dtypes.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= {"forward", "forward_backward"}:
        parser.error(f"--modes must name forward and/or forward_backward, got {args.modes}")

    torch.manual_seed(0)
    overrides = {} if args.depth is None else {"depth": args.depth}
    encoder = Encoder.from_preset(args.preset, **overrides).eval()
    batch = mixed_workload(args.num_xrays, args.num_cts, encoder.config.patch_size)
    padded = PaddedRunner(encoder, batch)
    useful_tokens = batch.num_tokens + batch.num_images * encoder.num_prefix_tokens
    padded_tokens = padded.num_images * padded.max_length
    difference = check_padded_matches_packed(encoder, batch, padded)
    print(
        f"{args.preset} (depth {encoder.config.depth}): {batch.num_images} images, {useful_tokens} useful tokens, "
        f"padded to {padded_tokens}; padded vs packed max difference {difference:.2e}"
    )
    if not has_kernel("packed_attention_fwd", "cpu"):
        print("warning: mmv has no CPU packed_attention kernel here; the packed rows run the reference fallback")

    cases = [(dtype, mode) for dtype in chosen_dtypes for mode in modes]
    rows = []
    for dtype, mode in tqdm(cases, desc="cases"):
        backward = mode == "forward_backward"
        runners = {"packed": packed_runner(encoder, batch), "padded": padded}
        for run in runners.values():
            for _ in range(args.warmup):
                one_step(run, encoder, dtype, backward)
        # Interleaved, so that a change of load on a shared machine affects both alike.
        samples = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                samples[name].append(one_step(run, encoder, dtype, backward))
        timings = {name: statistics.median(values) for name, values in samples.items()}
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "mode": mode,
                "packed_ms": 1e3 * timings["packed"],
                "padded_ms": 1e3 * timings["padded"],
                "packed_tokens_per_s": useful_tokens / timings["packed"],
                "padded_tokens_per_s": useful_tokens / timings["padded"],
                "speedup": timings["padded"] / timings["packed"],
            }
        )

    header = f"{'dtype':<9} {'mode':<17} {'packed ms':>10} {'padded ms':>10} {'packed tok/s':>13} {'padded tok/s':>13} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['dtype']:<9} {r['mode']:<17} {r['packed_ms']:>10.1f} {r['padded_ms']:>10.1f} "
            f"{r['packed_tokens_per_s']:>13,.0f} {r['padded_tokens_per_s']:>13,.0f} {r['speedup']:>8.2f}x"
        )
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "torch": torch.__version__,
        "preset": args.preset,
        "depth": encoder.config.depth,
        "cpu_packed_attention_kernel": has_kernel("packed_attention_fwd", "cpu"),
        "workload": {
            "num_xrays": args.num_xrays,
            "num_cts": args.num_cts,
            "sequence_lengths_with_cls": sorted(set(n + 1 for n in batch.lengths)),
            "useful_tokens": useful_tokens,
            "padded_tokens": padded_tokens,
        },
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median",
        "padded_vs_packed_max_difference": difference,
        "results": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(results, args.plot)


if __name__ == "__main__":
    main()
