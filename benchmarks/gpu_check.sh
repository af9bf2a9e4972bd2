#!/usr/bin/env bash
# The one script for a GPU machine (docs/design.md, "How the kernels are checked"; benchmarks/GPU_CHECK.md says
# how to read its output). It prints the GPU, builds mmv in place for this GPU's architecture only with
# every core, runs the CUDA tests, a short end-to-end pass (benchmarks/gpu_e2e.py: the encoder against
# the CPU, pretraining steps, mmv embed), the GPU benchmark, and prints a short summary table last.
# Every stage has a time limit, so the script ends within 8 minutes even if one hangs; a stage that
# fails is reported and the next one runs anyway. It installs nothing and needs no network: it uses
# the machine's own python3 (with PyTorch), nvcc and ninja.
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_SANITIZE=1 bash benchmarks/gpu_check.sh   # adds a compute-sanitizer memcheck stage
#   GPU_CHECK_SKIP_BUILD=1 bash benchmarks/gpu_check.sh # reuses the in-place build of an earlier run
#
# Output files (at most six, so that a remote run can hand them all back) go to $OUT if it is set,
# else benchmarks/out/gpu_check: gpu_check.log (every stage's full output), cuda_tests.xml (JUnit),
# e2e.json, bench_gpu.json, bench_gpu.txt and summary.txt.

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out_dir=${OUT:-benchmarks/out/gpu_check}
mkdir -p "$out_dir"
python=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# Stage limits in seconds: 20 + 150 + 110 + 90 + 90 = 460, under 8 minutes with the summary. The
# optional memcheck takes its minute from the benchmark.
info_s=${GPU_CHECK_INFO_S:-20}
build_s=${GPU_CHECK_BUILD_S:-150}
tests_s=${GPU_CHECK_TESTS_S:-110}
e2e_s=${GPU_CHECK_E2E_S:-90}
bench_s=${GPU_CHECK_BENCH_S:-90}
sanitize_s=${GPU_CHECK_SANITIZE_S:-60}
if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ]; then bench_s=$((bench_s - sanitize_s)); fi

log="$out_dir/gpu_check.log"
: >"$log"
stage_lines=()

# run_stage NAME LIMIT_S FUNCTION: runs one of the stage functions below under a time limit, appends
# its output to the log, shows its last lines, and records its status for the summary.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local stage_log
  stage_log=$(mktemp)
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" bash -c "$*" >"$stage_log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="TIMED OUT"
  elif [ $rc -ne 0 ]; then
    status="FAILED (exit $rc)"
  fi
  { echo "=== $name: $status after ${took}s: $*"; cat "$stage_log"; echo; } >>"$log"
  tail -n 25 "$stage_log"
  rm -f "$stage_log"
  stage_lines+=("$(printf '%-9s %-18s %5ss' "$name" "$status" "$took")")
  return $rc
}

gpu_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv
  nvcc --version | tail -n 2
  "$python" - <<'EOF'
import os, torch
props = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {props.name}, capability "
      f"{props.major}.{props.minor}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
      f"{os.cpu_count()} CPU cores")
EOF
}

build() {
  if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
    local arch
    arch=$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc)"
    TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" MMV_CUDA=1 "$python" setup.py build_ext --inplace || return 1
  fi
  "$python" -c 'from mmv.ops import has_kernel; import sys
names = ("rope3d", "packed_attention_fwd", "packed_attention_bwd")
missing = [n for n in names if not has_kernel(n, "cuda")]
print("CUDA kernels registered:", ", ".join(n for n in names if n not in missing))
sys.exit(f"no CUDA kernel for {missing}" if missing else 0)'
}

# Eight pytest workers when pytest-xdist is there: the float64 references run on the CPU.
cuda_tests() {
  local workers=()
  if "$python" -c "import xdist" 2>/dev/null; then workers=(-n 8); fi
  "$python" -m pytest -m cuda tests/test_cuda_ops.py -q -p no:cacheprovider "${workers[@]}" -o junit_family=xunit2 \
    --junitxml="$out_dir/cuda_tests.xml"
}

e2e() {
  "$python" benchmarks/gpu_e2e.py --json "$out_dir/e2e.json"
}

# A small forward and backward on every kernel path, with valid and with corrupt cu_seqlens
# (validate=False), under compute-sanitizer's memcheck: any out-of-bounds access fails the stage.
memcheck() {
  compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 "$python" - <<'EOF'
import torch
from mmv.ops import packed_attention
torch.manual_seed(0)
valid = torch.tensor([0, 70, 70, 71, 200], dtype=torch.int32, device="cuda")
corrupt = [torch.tensor(c, dtype=torch.int32, device="cuda") for c in ([0, 300, 20, -5, 200], [7, 3, 2**31 - 1])]
for dtype, head_dim in ((torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 32), (torch.float32, 48)):
    for deterministic in (False, True):
        for cu_seqlens in [valid, *corrupt]:
            q, k, v = (torch.randn(200, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            out = packed_attention(q, k, v, cu_seqlens, validate=False, deterministic=deterministic)
            out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("memcheck cases done")
EOF
}

bench() {
  "$python" benchmarks/bench_gpu.py --budget-s $((bench_s - 35)) --json "$out_dir/bench_gpu.json" \
    --table "$out_dir/bench_gpu.txt"
}

export -f gpu_info build cuda_tests e2e memcheck bench
export python out_dir bench_s

run_stage gpu "$info_s" gpu_info
if run_stage build "$build_s" build; then
  run_stage tests "$tests_s" cuda_tests
  run_stage e2e "$e2e_s" e2e
  if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ]; then run_stage memcheck "$sanitize_s" memcheck; fi
  run_stage bench "$bench_s" bench
else
  stage_lines+=("tests     not run (no build)" "e2e       not run (no build)" "bench     not run (no build)")
fi

# Summary, last: stage status, test counts, the benchmark table.
{
  echo
  echo "=== summary ($(date -u '+%Y-%m-%d %H:%M UTC'); full output in $log)"
  "$python" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__)' 2>/dev/null
  printf '%s\n' "${stage_lines[@]}"
  if [ -f "$out_dir/cuda_tests.xml" ]; then
    "$python" - "$out_dir/cuda_tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
print("cuda tests: {tests} run, {failures} failed, {errors} errors, {skipped} skipped".format(**counts))
failed = []
for case in suite.iter("testcase"):
    problem = case.find("failure") if case.find("failure") is not None else case.find("error")
    if problem is not None:
        message = (problem.get("message") or "").splitlines()
        failed.append(f"  FAILED {case.get('name')}: {message[0][:150] if message else ''}")
if failed:
    print("\n".join(failed[:20] + (["  ... and more, see the log"] if len(failed) > 20 else [])))
EOF
  fi
  if [ -f "$out_dir/e2e.json" ]; then
    "$python" -c 'import json, sys
for row in json.load(open(sys.argv[1]))["checks"]:
    print("e2e", "ok  " if row["ok"] else "FAIL", row["check"] + ":", row["figures"])' "$out_dir/e2e.json"
  fi
  if [ -f "$out_dir/bench_gpu.txt" ]; then cat "$out_dir/bench_gpu.txt"; fi
} | tee "$out_dir/summary.txt"
