"""mmv's two ops against what a PyTorch user would otherwise run, measured in the same process.

Workloads (docs/design.md): ``mixed``, the standard batch of 24 chest X-rays of 197 tokens and 2 CT crops of
1729 tokens, and ``long``, 2 sequences of 4096 tokens; H = 6 heads of D = 64 channels.

packed_attention, forward and forward + backward, against:

- ``sdpa_loop``: ``F.scaled_dot_product_attention`` called once per sequence, outputs concatenated.
- ``sdpa_padded``: one SDPA call on the batch padded to the longest sequence with a key-padding mask.
  Padding and unpadding are done before timing: only the attention is timed.
- ``sdpa_nested``: SDPA on jagged nested tensors viewing contiguous packed q, k and v.
- ``flex``: compiled FlexAttention with a document mask over the packed tokens. Building the block
  mask and compiling happen before timing; the block mask's build time is reported as setup.

rope3d on the workload's queries (a ``qkv[:, 0]`` view, as in the encoder), forward and forward +
backward, against a plain PyTorch RoPE written the usual way: angles from positions, ``cos``/``sin``
tables, ``x * cos + rotate_half(x) * sin``; once with the tables built in the call (``plain_rope``)
and once with them built beforehand (``plain_rope_cached``). ``copy_limit``, a clone of x, is not RoPE
but the least any op producing a new tensor from x costs.

Speed: median over ``--repeats`` timed runs after ``--warmup`` untimed ones, the methods interleaved
so that a busy machine slows all alike; a method whose single run exceeds ``--budget-s`` / repeats gets
fewer timed runs (at least one), and the JSON lists every run. GFLOP/s count the useful per-sequence FLOPs only: forward
``4 * L^2 * D * H`` summed over sequences, backward 2.5x that, forward + backward 3.5x; padding is
never counted. rope3d reports GB/s of x read and written. "mmv speedup" is the method's time over
mmv's. Every method's output is checked against mmv's before timing. A baseline that cannot run here
(an unsupported device or dtype) is reported as n/a with the reason. The matmul rate and the copy
bandwidth of the device are measured first, as the limits.

    python benchmarks/bench_ops.py --json ops.json --plot ops.png
    python benchmarks/bench_ops.py --workloads mixed --dtypes float32 --repeats 3 --baselines sdpa_loop
    python benchmarks/bench_ops.py --device cuda --json ops_cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_encoder import machine_description
from tqdm.auto import tqdm

from mmv.ops import has_kernel, packed_attention, rope3d, rope_freqs

WORKLOADS = {"mixed": [197] * 24 + [1729] * 2, "long": [4096] * 2}
NUM_HEADS, HEAD_DIM = 6, 64
ROPE_SECTIONS = (12, 10, 10)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DIRECTIONS = ("fwd", "fwd+bwd")
ATTENTION_BASELINES = ("sdpa_loop", "sdpa_padded", "sdpa_nested", "flex")
ROPE_BASELINES = ("plain_rope", "plain_rope_cached", "copy_limit")
BACKWARD_FLOP_FACTOR = {"fwd": 1.0, "fwd+bwd": 3.5}
# Largest |difference| to mmv's output tolerated before a method is reported as disagreeing.
AGREEMENT = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


@dataclass
class Problem:
    """One packed batch: qkv of the workload, its offsets and token positions."""

    lengths: list[int]
    dtype: torch.dtype
    device: torch.device
    qkv: torch.Tensor  # (T, 3, H, D)
    cu_seqlens: torch.Tensor
    coords: torch.Tensor
    freqs: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


def make_problem(lengths: list[int], dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    qkv = torch.randn(num_tokens, 3, NUM_HEADS, HEAD_DIM, generator=generator).to(device=device, dtype=dtype)
    offsets = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    # Token centres in millimetres of a CT-sized field of view.
    coords = (torch.rand(num_tokens, 3, generator=generator) * 2 - 1) * 200
    freqs = rope_freqs(HEAD_DIM, ROPE_SECTIONS)
    return Problem(lengths, dtype, device, qkv, offsets.to(device), coords.to(device), freqs.to(device))


def useful_attention_gflop(lengths: list[int], direction: str) -> float:
    forward = sum(4 * length**2 * HEAD_DIM * NUM_HEADS for length in lengths)
    return forward * BACKWARD_FLOP_FACTOR[direction] / 1e9


# Methods ------------------------------------------------------------------------------------------


@dataclass
class Method:
    """A way to compute an op: ``run`` maps the method's own inputs to its output.

    ``prepare`` builds, outside timing, whatever the method needs besides the tensors (masks, compiled
    functions) and returns how to turn a packed ``(T, H, D)`` tensor into the method's input layout
    and its output back into the packed layout.
    """

    name: str
    run: Callable[..., torch.Tensor]
    to_native: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    from_native: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    setup_s: float = 0.0
    computes_the_op: bool = True  # False for a limit such as a plain copy, whose output is not checked


def mmv_attention(problem: Problem) -> Method:
    return Method("mmv", lambda q, k, v: packed_attention(q, k, v, problem.cu_seqlens, problem.max_seqlen))


def sdpa_loop(problem: Problem) -> Method:
    bounds = problem.cu_seqlens.tolist()

    def run(q, k, v):
        outs = [
            F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
            ).transpose(0, 1)
            for start, end in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs)

    return Method("sdpa_loop", run)


def sdpa_padded(problem: Problem) -> Method:
    batch, longest = len(problem.lengths), problem.max_seqlen
    lengths = torch.tensor(problem.lengths, device=problem.device)
    valid = torch.arange(longest, device=problem.device)[None, :] < lengths[:, None]  # (B, L)
    mask = valid[:, None, None, :]  # keys only: padded queries still see real keys, so no NaN

    def to_native(t):
        padded = t.new_zeros(batch, longest, *t.shape[1:])
        padded[valid] = t.detach()
        return padded.transpose(1, 2)  # (B, H, L, D)

    def from_native(t):
        return t.transpose(1, 2)[valid]

    return Method(
        "sdpa_padded", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), to_native, from_native
    )


def sdpa_nested(problem: Problem) -> Method:
    offsets = problem.cu_seqlens.long()

    def run(q, k, v):
        q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()

    # Contiguous inputs, made before timing: SDPA on jagged views of a qkv tensor fails on a CPU here.
    return Method("sdpa_nested", run, to_native=lambda t: t.contiguous())


def flex_document_mask(problem: Problem) -> Method:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(
        torch.arange(len(problem.lengths), device=problem.device),
        torch.tensor(problem.lengths, device=problem.device),
    )

    def same_document(batch, head, q_index, kv_index):
        return document[q_index] == document[kv_index]

    torch._dynamo.reset()
    start = time.perf_counter()
    block_mask = create_block_mask(
        same_document, B=None, H=None, Q_LEN=problem.num_tokens, KV_LEN=problem.num_tokens, device=problem.device
    )
    setup_s = time.perf_counter() - start
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
        return compiled(q, k, v, block_mask=block_mask)[0].transpose(0, 1)

    return Method("flex", run, setup_s=setup_s)


ATTENTION_METHODS = {
    "sdpa_loop": sdpa_loop,
    "sdpa_padded": sdpa_padded,
    "sdpa_nested": sdpa_nested,
    "flex": flex_document_mask,
}


def mmv_rope(problem: Problem) -> Method:
    return Method("mmv", lambda x: rope3d(x, problem.coords, problem.freqs, ROPE_SECTIONS))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_tables(problem: Problem, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every channel's angle, (T, 1, D), as RoPE implementations usually build them."""
    num_pairs = HEAD_DIM // 2
    axis_freqs = problem.freqs.split([*ROPE_SECTIONS, num_pairs - sum(ROPE_SECTIONS)])
    angles = torch.cat(
        [problem.coords[:, axis, None] * axis_freqs[axis] for axis in range(3)]
        + [problem.coords.new_zeros(problem.num_tokens, axis_freqs[3].numel())],
        dim=-1,
    )
    channel_angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return channel_angles.cos().to(dtype), channel_angles.sin().to(dtype)


def plain_rope(problem: Problem) -> Method:
    def run(x):
        cos, sin = rope_tables(problem, x.dtype)
        return x * cos + rotate_half(x) * sin

    return Method("plain_rope", run)


def plain_rope_cached(problem: Problem) -> Method:
    cos, sin = rope_tables(problem, problem.dtype)
    return Method("plain_rope_cached", lambda x: x * cos + rotate_half(x) * sin)


def copy_limit(problem: Problem) -> Method:
    """Not RoPE: a copy of x into a new tensor, the least any out-of-place op on x costs."""
    return Method("copy_limit", lambda x: x.clone(), computes_the_op=False)


ROPE_METHODS = {"plain_rope": plain_rope, "plain_rope_cached": plain_rope_cached, "copy_limit": copy_limit}


# Timing -------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    """One method on one case, ready to be timed repeatedly."""

    method: Method
    step: Callable[[], None]
    device: torch.device
    times_s: list[float] = field(default_factory=list)
    max_runs: int = 1

    def time_once(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.step()
        synchronize(self.device)
        return time.perf_counter() - start

    def warm_up(self, warmup: int, repeats: int, budget_s: float) -> None:
        """Untimed runs, then as many timed runs as ``budget_s`` allows (at least one, at most repeats)."""
        first_s = self.time_once()
        for _ in range(warmup - 1 if first_s < budget_s else 0):
            first_s = self.time_once()
        self.max_runs = max(1, min(repeats, int(budget_s / first_s)))

    def record(self) -> None:
        if len(self.times_s) < self.max_runs:
            self.times_s.append(self.time_once())


def make_runner(method: Method, packed_inputs: list[torch.Tensor], grad_out: torch.Tensor, direction: str,
                device: torch.device) -> tuple[Runner, torch.Tensor]:
    """A runner for ``method`` and its forward output in the packed layout (to check it)."""
    inputs = [method.to_native(t).detach() for t in packed_inputs]
    if direction == "fwd":

        def step():
            with torch.no_grad():
                method.run(*inputs)

        with torch.no_grad():
            output = method.from_native(method.run(*inputs))
        return Runner(method, step, device), output

    leaves = [t.requires_grad_(True) for t in inputs]
    native_grad = method.to_native(grad_out).detach()

    def step():
        for leaf in leaves:
            leaf.grad = None
        method.run(*leaves).backward(native_grad)

    output = method.from_native(method.run(*leaves)).detach()
    return Runner(method, step, device), output


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def run_case(
    op: str, problem: Problem, direction: str, baselines: list[str], warmup: int, repeats: int, budget_s: float
) -> list[dict]:
    """Time mmv and the baselines on one (op, workload, dtype, direction); one result row per method."""
    generator = torch.Generator().manual_seed(1)
    if op == "attention":
        packed_inputs = list(problem.qkv.unbind(1))
        factories = {"mmv": mmv_attention} | {name: ATTENTION_METHODS[name] for name in baselines}
    else:
        packed_inputs = [problem.qkv[:, 0]]
        factories = {"mmv": mmv_rope} | {name: ROPE_METHODS[name] for name in baselines}
    grad_out = torch.randn(packed_inputs[0].shape, generator=generator).to(problem.device, problem.dtype)

    rows, runners, reference = {}, [], None
    for name, factory in factories.items():
        row = {"method": name, "ms": None, "setup_ms": None, "max_abs_diff": None, "error": None}
        rows[name] = row
        try:
            method = factory(problem)
            row["setup_ms"] = 1e3 * method.setup_s if method.setup_s else None
            runner, output = make_runner(method, packed_inputs, grad_out, direction, problem.device)
            runner.warm_up(warmup, repeats, budget_s)
        except Exception as error:  # a baseline that does not run on this device / dtype is reported
            if name == "mmv":
                raise
            row["error"] = first_line(error)
            continue
        if reference is None:
            reference = output.float()
        elif method.computes_the_op:
            row["max_abs_diff"] = (output.float() - reference).abs().max().item()
            if row["max_abs_diff"] > AGREEMENT[problem.dtype]:
                row["error"] = f"disagrees with mmv by {row['max_abs_diff']:.3g}"
        runners.append(runner)

    for _ in range(repeats):
        for runner in runners:
            runner.record()

    mmv_ms = 1e3 * statistics.median(runners[0].times_s)
    gflop = useful_attention_gflop(problem.lengths, direction) if op == "attention" else None
    x_bytes = packed_inputs[0].element_size() * packed_inputs[0].numel()
    for runner in runners:
        row = rows[runner.method.name]
        row["ms"] = 1e3 * statistics.median(runner.times_s)
        row["all_ms"] = [1e3 * t for t in runner.times_s]
        row["mmv_speedup"] = row["ms"] / mmv_ms
        if gflop is not None:
            row["gflop_per_s"] = gflop / (row["ms"] / 1e3)
        else:  # x read and written, forward; twice that with the backward
            passes = 1 if direction == "fwd" else 2
            row["gb_per_s"] = passes * 2 * x_bytes / 1e9 / (row["ms"] / 1e3)
    return list(rows.values())


def measure_limits(device: torch.device, dtypes: list[torch.dtype], repeats: int) -> dict:
    """The device's matmul rate per dtype and its copy bandwidth (bytes read + written)."""
    size = 8192 if device.type == "cuda" else 2048
    limits = {}
    for dtype in dtypes:
        a = torch.randn(size, size, device=device).to(dtype)
        a @ a
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            a @ a
            synchronize(device)
            times.append(time.perf_counter() - start)
        limits[f"matmul_{dtype_name(dtype)}_gflop_per_s"] = 2 * size**3 / statistics.median(times) / 1e9
    # Into a buffer written before, so that first-touch page faults are not counted.
    source, destination = torch.ones(2, 64 * 2**20, device=device)  # 256 MB each
    destination.copy_(source)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        destination.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    limits["copy_gb_per_s"] = 2 * source.numel() * source.element_size() / statistics.median(times) / 1e9
    return limits


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Report -------------------------------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    header = f"{'op':<10} {'workload':<8} {'dtype':<9} {'pass':<8} {'method':<18} {'ms':>9} {'rate':>15} {'mmv speedup':>12}"
    lines = [header, "-" * len(header)]
    for row in results:
        if row["ms"] is None:
            rate, ms, speedup = "n/a", "n/a", ""
        else:
            ms = f"{row['ms']:.2f}"
            rate = f"{row['gflop_per_s']:.0f} GFLOP/s" if "gflop_per_s" in row else f"{row['gb_per_s']:.1f} GB/s"
            speedup = "" if row["method"] == "mmv" else f"{row['mmv_speedup']:.2f}x"
        line = (
            f"{row['op']:<10} {row['workload']:<8} {row['dtype']:<9} {row['direction']:<8} {row['method']:<18} "
            f"{ms:>9} {rate:>15} {speedup:>12}"
        )
        if row["error"]:
            line += f"  ({row['error']})"
        lines.append(line)
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    """One panel per op: mmv's speedup over each baseline, per workload, dtype and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in results))
    figure, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for axis, op in zip(axes[0], ops):
        rows = [r for r in results if r["op"] == op]
        cases = list(dict.fromkeys((r["workload"], r["dtype"], r["direction"]) for r in rows))
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "mmv"]
        speedups = {(r["workload"], r["dtype"], r["direction"], r["method"]): r.get("mmv_speedup") for r in rows}
        width = 0.8 / max(1, len(methods))
        for index, method in enumerate(methods):
            positions = [c + (index - (len(methods) - 1) / 2) * width for c in range(len(cases))]
            values = [speedups.get((*case, method)) for case in cases]
            axis.bar(positions, [v or 0.0 for v in values], width, label=method)
            for position, value in zip(positions, values):
                if value is None:
                    axis.text(position, 1.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xticks(range(len(cases)))
        axis.set_xticklabels(["\n".join(case) for case in cases], fontsize=7)
        axis.set_ylabel("mmv speedup (baseline time / mmv time)")
        axis.set_title(op)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ops", nargs="+", default=["attention", "rope3d"], choices=["attention", "rope3d"])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    parser.add_argument(
        "--baselines",
        nargs="+",
        default=list(ATTENTION_BASELINES + ROPE_BASELINES),
        choices=list(ATTENTION_BASELINES + ROPE_BASELINES),
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--budget-s", type=float, default=30.0, help="timed runs of one method on one case stop after about this long"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plot", type=Path, help="write a PNG chart of the speedups here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")
    for op_name in ("rope3d", "packed_attention_fwd", "packed_attention_bwd"):
        if not has_kernel(op_name, device.type):
            print(f"warning: no mmv {device.type} kernel for {op_name}; mmv rows time the reference", file=sys.stderr)
    dtypes = [DTYPES[name] for name in args.dtypes]
    machine = machine_description()
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"

    limits = measure_limits(device, dtypes, repeats=3)
    cases = [
        (op, workload, dtype, direction)
        for op in args.ops
        for workload in args.workloads
        for dtype in dtypes
        for direction in args.directions
    ]
    results = []
    for op, workload, dtype, direction in tqdm(cases, desc="cases"):
        problem = make_problem(WORKLOADS[workload], dtype, device)
        baselines = [b for b in args.baselines if b in (ATTENTION_BASELINES if op == "attention" else ROPE_BASELINES)]
        for row in run_case(op, problem, direction, baselines, args.warmup, args.repeats, args.budget_s):
            results.append({"op": op, "workload": workload, "dtype": dtype_name(dtype), "direction": direction, **row})

    print(f"machine: {machine}; torch {torch.__version__}")
    print("limits: " + ", ".join(f"{name} {value:.0f}" for name, value in limits.items()))
    print(format_table(results))
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
        "workloads": {name: WORKLOADS[name] for name in args.workloads},
        "num_heads": NUM_HEADS,
        "head_dim": HEAD_DIM,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "limits": limits,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(results, args.plot, f"mmv ops vs PyTorch baselines - {machine}")


if __name__ == "__main__":
    main()
