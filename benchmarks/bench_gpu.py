"""mmv's CUDA kernels against what a PyTorch user would otherwise run on the GPU, timed on the device.

The benchmark stage of ``benchmarks/gpu_check.sh`` (see ``benchmarks/GPU_CHECK.md``). Workloads, the
packed problem and the FLOP count come from ``bench_ops.py``: ``mixed`` is 24 chest X-rays of 197
tokens and 2 CT crops of 1729, ``long`` 2 sequences of 4096 tokens; H = 6, D = 64.

packed_attention, forward and forward + backward, bfloat16 then float16:

- ``mmv``: ``mmv.ops.packed_attention`` with ``validate=False`` (the hot path of a validated
  ``PackedBatch``: no host synchronisation); ``mmv_det`` the same with ``deterministic=True``.
- ``sdpa_loop``: SDPA with the flash backend forced, once per sequence.
- ``sdpa_nested``: SDPA with the flash backend forced, on jagged nested tensors.
- ``flex``: compiled FlexAttention with a document mask (bfloat16, mixed workload only: each compile
  costs tens of seconds). The block mask's build time is reported as setup, outside the timing.

rope3d on the workload's queries (a ``qkv[:, 0]`` view) and on a contiguous gradient (what the
backward rotates), against a device-to-device copy of the same bytes, on the mixed workload and on a
batch of 131072 tokens whose tensors do not fit in L2.

The limits, measured first: the bfloat16 matmul rate (8192^3) and the copy bandwidth (1 GiB, bytes read
plus written). Times are per call, from CUDA events around replays of a CUDA graph holding several
calls, so launch gaps do not count; a method that cannot be captured is timed eagerly (marked so).
TFLOP/s count useful FLOPs only (per sequence, 4 L^2 D H forward, 3.5x that forward + backward).
Every method's output is compared with mmv's before it is timed. Results are written after every case
(``--json``, ``--table``), so a run stopped by its time limit still leaves what it measured.

    python benchmarks/bench_gpu.py --json out/bench_gpu.json --table out/bench_gpu.txt
    python benchmarks/bench_gpu.py --dry-run    # small problems on the CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_ops import (
    NUM_HEADS,
    ROPE_SECTIONS,
    WORKLOADS,
    Problem,
    first_line,
    flex_document_mask,
    make_problem,
    useful_attention_gflop,
)

from mmv.ops import packed_attention, rope3d

ROPE_LARGE_TOKENS = 131072
# Largest |difference| to mmv's output tolerated before a method is reported as disagreeing.
AGREEMENT = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 2e-3}


@dataclass
class Timing:
    ms: float
    how: str  # "graph", "eager" or "cpu"


def time_calls(step: Callable[[], None], device: torch.device, calls_per_graph: int = 10, replays: int = 5) -> Timing:
    """Milliseconds per call of ``step``, after warm-up."""
    for _ in range(3):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(replays):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return Timing(1e3 * statistics.median(times), "cpu")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                step()
        graph.replay()
        torch.cuda.synchronize()
        samples = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls_per_graph)
        return Timing(statistics.median(samples), "graph")
    except Exception:  # not capturable (a host synchronisation inside): time it eagerly
        torch.cuda.synchronize()
        samples = []
        for _ in range(replays):
            start.record()
            for _ in range(calls_per_graph):
                step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls_per_graph)
        return Timing(statistics.median(samples), "eager")


# Attention methods: each maps packed (T, H, D) q, k, v to the packed output. ---------------------


def mmv_method(problem: Problem, deterministic: bool = False) -> Callable:
    def run(q, k, v):
        return packed_attention(
            q, k, v, problem.cu_seqlens, problem.max_seqlen, validate=False, deterministic=deterministic
        )

    return run


def flash_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def sdpa_loop_method(problem: Problem) -> Callable:
    bounds = problem.cu_seqlens.tolist()

    def run(q, k, v):
        with flash_backend():
            outs = [
                F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None]
                )[0].transpose(0, 1)
                for s, e in zip(bounds[:-1], bounds[1:])
            ]
        return torch.cat(outs)

    return run


def sdpa_nested_method(problem: Problem) -> Callable:
    offsets = problem.cu_seqlens.long()
    lengths = problem.lengths

    def run(q, k, v):
        q, k, v = (
            torch.nested.nested_tensor_from_jagged(
                t, offsets, min_seqlen=min(lengths), max_seqlen=max(lengths)
            ).transpose(1, 2)
            for t in (q, k, v)
        )
        with flash_backend():
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()

    return run


_flex_methods: dict[int, tuple[Callable, float]] = {}


def flex_method(problem: Problem) -> tuple[Callable, float]:
    """One block mask and compiled function per problem, shared by its forward and forward + backward
    cases (building another resets the compiler and compiles again)."""
    if id(problem) not in _flex_methods:
        method = flex_document_mask(problem)
        _flex_methods[id(problem)] = (method.run, method.setup_s)
    return _flex_methods[id(problem)]


def attention_step(run: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor, direction: str):
    """The timed step and the method's output (to check it)."""
    if direction == "fwd":
        with torch.no_grad():
            output = run(*inputs)

        def step():
            with torch.no_grad():
                run(*inputs)

        return step, output
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    output = run(*leaves)

    def step():
        for leaf in leaves:
            leaf.grad = None
        run(*leaves).backward(grad_out)

    return step, output.detach()


# Cases --------------------------------------------------------------------------------------------


def attention_case(problem: Problem, workload: str, direction: str, with_flex: bool, peak_tflops: float | None):
    inputs = [t.contiguous() for t in problem.qkv.unbind(1)]  # contiguous: nested SDPA needs it
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(problem.device, problem.dtype)
    methods: dict[str, Callable[[], tuple[Callable, float]]] = {
        "mmv": lambda: (mmv_method(problem), 0.0),
        "sdpa_loop": lambda: (sdpa_loop_method(problem), 0.0),
        "sdpa_nested": lambda: (sdpa_nested_method(problem), 0.0),
    }
    if direction == "fwd+bwd":
        methods["mmv_det"] = lambda: (mmv_method(problem, deterministic=True), 0.0)
    if with_flex:
        methods["flex"] = lambda: flex_method(problem)
    tflop = useful_attention_gflop(problem.lengths, direction) / 1e3
    rows, reference, mmv_ms = [], None, None
    for name, factory in methods.items():
        row = {"op": "attention", "workload": workload, "dtype": dtype_name(problem.dtype), "pass": direction,
               "method": name, "ms": None, "how": None, "setup_ms": None, "error": None}
        try:
            run, setup_s = factory()
            row["setup_ms"] = 1e3 * setup_s if setup_s else None
            step, output = attention_step(run, inputs, grad_out, direction)
            if reference is None:
                reference = output.float()
            else:
                row["max_abs_diff"] = (output.float() - reference).abs().max().item()
                if row["max_abs_diff"] > AGREEMENT[problem.dtype]:
                    row["error"] = f"disagrees with mmv by {row['max_abs_diff']:.3g}"
            timing = time_calls(step, problem.device)
        except Exception as error:  # a baseline that cannot run here is reported, not fatal
            if name == "mmv":
                raise
            row["error"] = first_line(error)
            rows.append(row)
            continue
        row["ms"], row["how"] = timing.ms, timing.how
        row["tflop_per_s"] = tflop / (timing.ms / 1e3)
        if name == "mmv":
            mmv_ms = timing.ms
            if peak_tflops:
                row["fraction_of_matmul_peak"] = row["tflop_per_s"] / peak_tflops
        else:
            row["mmv_speedup"] = timing.ms / mmv_ms
        rows.append(row)
    return rows


def rope_case(problem: Problem, workload: str) -> list[dict]:
    x = problem.qkv[:, 0]  # the (T, H, D) view the encoder rotates
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(problem.device, problem.dtype)
    destination = torch.empty_like(grad)
    bytes_moved = 2 * grad.numel() * grad.element_size()
    methods = {
        "mmv_fwd": lambda: rope3d(x, problem.coords, problem.freqs, ROPE_SECTIONS),
        "mmv_bwd": lambda: rope3d(grad, problem.coords, -problem.freqs, ROPE_SECTIONS),
        "copy": lambda: destination.copy_(grad),
    }
    timings = {name: time_calls(step, problem.device, calls_per_graph=50) for name, step in methods.items()}
    rows = []
    for name, timing in timings.items():
        rows.append({
            "op": "rope3d", "workload": workload, "dtype": dtype_name(problem.dtype), "pass": name.split("_")[-1],
            "method": name, "ms": timing.ms, "how": timing.how, "error": None,
            "gb_per_s": bytes_moved / 1e9 / (timing.ms / 1e3),
            "fraction_of_copy": timings["copy"].ms / timing.ms,
        })
    return rows


def measure_limits(device: torch.device, dry_run: bool) -> dict:
    size = 512 if dry_run else 8192
    a, b = (torch.randn(size, size, generator=torch.Generator().manual_seed(i)).to(device, torch.bfloat16) for i in (3, 4))
    matmul = time_calls(lambda: a @ b, device, calls_per_graph=5)
    source = torch.randn(2**20 if dry_run else 2**28, generator=torch.Generator().manual_seed(5)).to(device)  # 1 GiB
    destination = torch.empty_like(source)
    copy = time_calls(lambda: destination.copy_(source), device, calls_per_graph=5)
    return {
        "matmul_bf16_tflop_per_s": 2 * size**3 / (matmul.ms / 1e3) / 1e12,
        "copy_gb_per_s": 2 * source.numel() * source.element_size() / (copy.ms / 1e3) / 1e9,
    }


# Report -------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_table(rows: list[dict], limits: dict) -> str:
    lines = [
        "limits: bf16 matmul {:.0f} TFLOP/s, copy {:.0f} GB/s".format(
            limits.get("matmul_bf16_tflop_per_s", float("nan")), limits.get("copy_gb_per_s", float("nan"))
        ),
        f"{'op':<9} {'workload':<8} {'dtype':<8} {'pass':<7} {'method':<11} {'ms':>8} {'rate':>14} {'vs':>22}",
    ]
    for row in rows:
        if row["ms"] is None:
            lines.append(f"{row['op']:<9} {row['workload']:<8} {row['dtype']:<8} {row['pass']:<7} {row['method']:<11} "
                         f"{'n/a':>8}  ({row['error']})")
            continue
        if "tflop_per_s" in row:
            rate = f"{row['tflop_per_s']:.0f} TFLOP/s"
            if "mmv_speedup" in row:
                versus = f"mmv {row['mmv_speedup']:.2f}x faster"
            elif "fraction_of_matmul_peak" in row:
                versus = f"{row['fraction_of_matmul_peak']:.2f} of matmul peak"
            else:
                versus = ""
        else:
            rate = f"{row['gb_per_s']:.0f} GB/s"
            versus = f"{row['fraction_of_copy']:.2f} of copy" if row["method"] != "copy" else ""
        line = (f"{row['op']:<9} {row['workload']:<8} {row['dtype']:<8} {row['pass']:<7} {row['method']:<11} "
                f"{row['ms']:>8.3f} {rate:>14} {versus:>22}")
        if row["how"] != "graph":
            line += f"  [{row['how']}]"
        if row.get("setup_ms"):
            line += f"  [setup {row['setup_ms']:.0f} ms]"
        if row["error"]:
            line += f"  ({row['error']})"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    parser.add_argument("--budget-s", type=float, default=110.0, help="start no new case after this many seconds")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles are slow)")
    parser.add_argument("--json", type=Path, help="write every figure here (rewritten after each case)")
    parser.add_argument("--table", type=Path, help="write the table here (rewritten after each case)")
    parser.add_argument("--dry-run", action="store_true", help="tiny problems on the CPU, to check the script")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.dry_run:
        device = torch.device("cpu")
        workloads = {"mixed": [5, 0, 17], "long": [40]}
        rope_tokens = 64
    else:
        if not torch.cuda.is_available():
            # `make bench` runs every benchmark on machines without a GPU too: say so and succeed.
            print("bench_gpu.py: no GPU is visible, nothing measured (--dry-run checks the script on the CPU)")
            return
        device = torch.device("cuda")
        workloads = {name: WORKLOADS[name] for name in ("mixed", "long")}
        rope_tokens = ROPE_LARGE_TOKENS
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    limits = measure_limits(device, args.dry_run)
    peak = limits["matmul_bf16_tflop_per_s"]

    # Most important first: rope3d (seconds), then attention on the mixed workload, where the targets
    # are set, before the long one; FlexAttention's compiles make the mixed bfloat16 cases the slowest.
    cases = []
    for dtype_label in args.dtypes:
        cases.append(("rope3d", f"{rope_tokens}tok", dtype_label, None))
        cases.append(("rope3d", "mixed", dtype_label, None))
        for workload in ("mixed", "long"):
            for direction in ("fwd", "fwd+bwd"):
                cases.append(("attention", workload, dtype_label, direction))

    problems: dict[tuple[str, str], Problem] = {}
    rows: list[dict] = []
    report = {"date": datetime.date.today().isoformat(), "device": machine, "torch": torch.__version__,
              "command": " ".join(sys.argv), "workloads": workloads, "num_heads": NUM_HEADS, "limits": limits,
              "results": rows}
    for op, workload, dtype_label, direction in cases:
        if time.perf_counter() - started > args.budget_s:
            rows.append({"op": op, "workload": workload, "dtype": dtype_label, "pass": direction or "",
                         "method": "*", "ms": None, "error": "skipped: over the time budget"})
            continue
        dtype = dtypes[dtype_label]
        if op == "attention":
            if (workload, dtype_label) not in problems:
                problems[(workload, dtype_label)] = make_problem(workloads[workload], dtype, device)
            problem = problems[(workload, dtype_label)]
            with_flex = not args.no_flex and workload == "mixed" and dtype == torch.bfloat16
            rows.extend(attention_case(problem, workload, direction, with_flex, peak))
        else:
            lengths = workloads["mixed"] if workload == "mixed" else [rope_tokens]
            rows.extend(rope_case(make_problem(lengths, dtype, device), workload))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        if args.table:
            args.table.write_text(format_table(rows, limits) + "\n")
        print(f"[{time.perf_counter() - started:.0f}s] {op} {workload} {dtype_label} {direction or ''} done", flush=True)

    print(f"device: {machine}; torch {torch.__version__}")
    print(format_table(rows, limits))


if __name__ == "__main__":
    main()
