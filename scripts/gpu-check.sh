#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H100/H200 with a CUDA 13 driver, nvcc, PyTorch and
# cuDNN, but no Rust). It runs what scripts/prepare-gpu-carry.sh built here into gpu-carry/:
#   1. every kernel's parity test against the CPU reference on cuda:0 at real sizes (and the
#      execution-model tests of kernels/selftest.cu, which show that the sim and the GPU agree);
#   2. compute-sanitizer: memcheck on a small run of the kernel tests, racecheck and synccheck on
#      the execution-model kernels;
#   3. the kernel benchmarks, PyTorch's times for the same ops on the same card, and the CPU conv
#      benchmark of the release binary;
# and writes $OUT/gpu-report.md (summary), tests.log, sanitizer.log and bench.md. Every step has a
# time limit inside an overall budget of about 9 minutes; a failed step is reported, the rest run.
#
#   here:  bash scripts/prepare-gpu-carry.sh
#   there: bash scripts/gpu-check.sh   (device tool: carry ["gpu-carry"], timeout_s 600)
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
carry="$root/gpu-carry"
out="${OUT:-$root/gpu-report}"
mkdir -p "$out"
# prepare-gpu-carry.sh packs the executables (they would not fit the carry limit unpacked).
if [[ -f "$carry/bins.tar.xz" ]]; then
  unpacked="$(mktemp -d)"
  trap 'rm -rf "$unpacked"' EXIT
  xz -dc "$carry/bins.tar.xz" | tar -C "$unpacked" -xf - || { echo "gpu-check: cannot unpack $carry/bins.tar.xz" >&2; exit 2; }
  cp "$carry/BUILD-INFO" "$unpacked/"
  carry="$unpacked"
fi
report="$out/gpu-report.md"
tests_log="$out/tests.log"
san_log="$out/sanitizer.log"
bench="$out/bench.md"
: >"$tests_log"
: >"$san_log"
: >"$bench"
deadline=$(($(date +%s) + ${GPU_CHECK_BUDGET_S:-540}))
failures=0

for f in unet3d lib_tests sim_runtime sim_kernels; do
  if [[ ! -x "$carry/$f" ]]; then
    echo "gpu-check: $carry/$f is missing; run scripts/prepare-gpu-carry.sh where Rust is, and carry gpu-carry/" >&2
    exit 2
  fi
done

{
  echo "# unet3d GPU check"
  echo
  echo '```'
  cat "$carry/BUILD-INFO"
  echo "run: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(ldd --version 2>&1 | head -n 1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  (nvcc --version 2>&1 || echo "nvcc: not found") | tail -n 1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' 2>&1 | tail -n 1
  echo '```'
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---:|"
} >"$report"

# step NAME LIMIT_S LOG CMD...: runs CMD (output appended to LOG) within its limit and what is left
# of the budget, and adds a row to the report.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local left=$((deadline - $(date +%s)))
  if ((left < 10)); then
    echo "| $name | skipped: time budget spent | 0 |" >>"$report"
    failures=$((failures + 1))
    return
  fi
  ((limit > left)) && limit=$left
  echo "===== $name: $*" >>"$log"
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local secs=$(($(date +%s) - t0)) result="ok"
  if ((rc == 124)); then
    result="FAILED: timed out after ${limit}s"
  elif ((rc != 0)); then
    result="FAILED (exit $rc)"
  fi
  if [[ "$result" != ok ]] && grep -q "Device not supported" "$log" 2>/dev/null && [[ "$name" == sanitizer* ]]; then
    result="unavailable: compute-sanitizer does not support this device (gVisor?)"
  elif [[ "$result" != ok ]]; then
    failures=$((failures + 1))
  fi
  echo "| $name | $result | $secs |" >>"$report"
  echo "$name: $result (${secs}s)"
}

export UNET3D_GPU_TESTS=1

# 1. Parity at real sizes, and the execution model on the GPU.
step "unit tests (cuda device)" 60 "$tests_log" "$carry/lib_tests" device::
step "execution model (selftest kernels)" 90 "$tests_log" "$carry/sim_runtime"
step "kernel parity vs CPU, real sizes" 200 "$tests_log" "$carry/sim_kernels"
# The conv kernels (kernels/conv.cu) are tested and benchmarked by the sim_conv executable, there
# when scripts/prepare-gpu-carry.sh builds `--test sim_conv`.
have_conv=0
[[ -x "$carry/sim_conv" ]] && have_conv=1
if ((have_conv)); then
  step "conv parity vs CPU, real sizes" 120 "$tests_log" "$carry/sim_conv"
else
  echo "| conv parity and benchmarks | skipped: gpu-carry/sim_conv not built | 0 |" >>"$report"
fi
# The fused norm / SE / loss kernels: the sim_fused executable (prepare-gpu-carry.sh `--test sim_fused`).
have_fused=0
[[ -x "$carry/sim_fused" ]] && have_fused=1
if ((have_fused)); then
  step "fused norm/SE/loss parity vs CPU, real sizes" 120 "$tests_log" "$carry/sim_fused"
else
  echo "| fused kernel parity and benchmarks | skipped: gpu-carry/sim_fused not built | 0 |" >>"$report"
fi
# The one network on cuda:0 against the CPU and the PyTorch fixture (and three optimizer steps),
# one training step's time, launches and transfers beside the CPU's, then a short training run and
# the demo's inference on the GPU (the demo with its device set to cuda:0).
if [[ -x "$carry/sim_network" ]]; then
  step "network forward/loss/backward parity vs CPU and PyTorch" 120 "$tests_log" "$carry/sim_network"
  echo "## training step: cuda:0 beside the CPU (unet3d bench step, model fixture network)" >>"$bench"
  step "bench step on cuda:0 with its counters" 60 "$bench" "$carry/unet3d" bench step --device cuda:0 --reps 5
  step "bench step on the cpu (baseline)" 60 "$bench" "$carry/unet3d" bench step --device cpu --reps 2
  step "short training run + inference on cuda:0 (demo, 2 epochs)" 150 "$tests_log" \
    "$carry/unet3d" demo --overwrite --set tr_setup.device=cuda:0 --set tr_config.max_epoch=2
else
  echo "| network parity and training run | skipped: gpu-carry/sim_network not built | 0 |" >>"$report"
fi

# 2. compute-sanitizer on small sizes (it slows kernels down by orders of magnitude).
sanitizer="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda; do
  [[ -z "$sanitizer" && -n "$d" && -x "$d/bin/compute-sanitizer" ]] && sanitizer="$d/bin/compute-sanitizer"
done
if [[ -n "$sanitizer" ]]; then
  step "sanitizer memcheck: kernel tests" 150 "$san_log" \
    env UNET3D_GPU_SMALL=1 "$sanitizer" --tool memcheck --error-exitcode 1 "$carry/sim_kernels" --test-threads 1
  step "sanitizer memcheck: execution model" 60 "$san_log" \
    "$sanitizer" --tool memcheck --error-exitcode 1 "$carry/sim_runtime" --test-threads 1
  step "sanitizer racecheck: execution model" 60 "$san_log" \
    "$sanitizer" --tool racecheck --error-exitcode 1 "$carry/sim_runtime" --test-threads 1
  step "sanitizer synccheck: execution model" 60 "$san_log" \
    "$sanitizer" --tool synccheck --error-exitcode 1 "$carry/sim_runtime" --test-threads 1
  # The sim runs a block's threads cooperatively, so it cannot see shared-memory races: the
  # conv kernels' double-buffered tiles are checked here, on the small shapes of their tests.
  if ((have_conv)); then
    for tool in memcheck racecheck synccheck; do
      step "sanitizer $tool: conv kernels" 90 "$san_log" \
        "$sanitizer" --tool "$tool" --error-exitcode 1 "$carry/sim_conv" --skip real_layer --skip conv_benchmarks --test-threads 1
    done
  fi
else
  echo "| sanitizer | unavailable: compute-sanitizer not found | 0 |" >>"$report"
fi

# 3. Benchmarks: ours, PyTorch's for the same ops and sizes, and the CPU conv table.
echo "## unet3d kernels" >>"$bench"
step "kernel benchmarks" 120 "$tests_log" \
  env UNET3D_BENCH_OUT="$bench" "$carry/sim_kernels" --ignored kernel_throughput --test-threads 1
echo "## PyTorch, same ops and sizes (channels_last_3d)" >>"$bench"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" ${unpacked:+"$unpacked"}' EXIT # replaces the trap above: both go
step "pytorch benchmarks" 120 "$bench" python3 scripts/gpu-bench-torch.py --elementwise
echo "## CPU conv3d (unet3d bench conv --quick, on this machine's cores)" >>"$bench"
step "cpu conv benchmark" 90 "$bench" "$carry/unet3d" bench conv --quick
if ((have_conv)); then
  echo "## conv3d / conv_transpose3d: unet3d vs cuDNN (ours / cuDNN > 1: ours is faster)" >>"$bench"
  step "conv benchmarks" 150 "$tests_log" \
    env UNET3D_BENCH_OUT="$tmp/conv_ours.md" "$carry/sim_conv" --ignored conv_throughput --test-threads 1
  step "cudnn conv benchmarks, joined" 150 "$bench" python3 scripts/gpu-bench-torch.py --ours "$tmp/conv_ours.md"
fi
if ((have_fused)); then
  echo "## instance norm, SE, Dice + CE: unet3d vs PyTorch eager (ours / PyTorch > 1: ours is faster)" >>"$bench"
  step "fused kernel benchmarks" 90 "$tests_log" \
    env UNET3D_BENCH_OUT="$tmp/fused_ours.md" "$carry/sim_fused" --ignored fused_throughput --test-threads 1
  step "pytorch fused benchmarks, joined" 90 "$bench" \
    python3 scripts/gpu-bench-torch.py --fused --ours "$tmp/fused_ours.md"
fi

{
  echo
  if ((failures == 0)); then echo "**Result: PASS**"; else echo "**Result: FAILED ($failures steps)**"; fi
  echo
  echo "Test summaries (tests.log):"
  echo '```'
  grep -E "^test result|FAILED|panicked|notice:" "$tests_log" | head -n 60
  echo '```'
  if [[ -s "$san_log" ]]; then
    echo "compute-sanitizer summaries (sanitizer.log):"
    echo '```'
    grep -E "ERROR SUMMARY|LEAK SUMMARY|RACECHECK SUMMARY|Device not supported|Error" "$san_log" | head -n 40
    echo '```'
  fi
  echo
  cat "$bench"
} >>"$report"
cat "$report"
((failures == 0))
