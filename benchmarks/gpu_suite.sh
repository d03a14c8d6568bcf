#!/usr/bin/env bash
# Everything a GPU session should run, from the repository root on the GPU machine:
#   bash benchmarks/gpu_suite.sh                    # all steps, within one 10-minute device call
#   bash benchmarks/gpu_suite.sh tests kl           # a subset, to split the work over device calls
# Steps: tests (kernel correctness on the GPU: Triton vocabulary passes, fused_replay_kl against the
# float64 reference, the CUDA top-k extension), kl (Llama-3-8B head, bf16, against naive PyTorch,
# three bare bf16 matmuls and Liger-Kernel if importable: `bash benchmarks/fetch_wheels.sh` here puts
# its wheel in .whl/, and the device call carries it with `carry: [".whl"]`; the headline N=8192 row runs
# first), topk, generate (1B Llama-shaped model, batch 256, speculative at batch 8), planner
# (predicted vs measured peak memory); vllm (not run by default: the generation benchmark with its vLLM row,
# where vLLM is installed; docs/vllm_gpu_plan.md says what to expect). Then plots and a summary table. Results land in
# benchmarks/results/ (and in $OUT when set, for the device tool to bring back, with the whole log).
#
# Time: the whole run keeps within SUITE_BUDGET_S seconds (default 570, under the device tool's
# 600-second limit per call), install and build included. Each step gets at most its own cap and
# at most what is left after keeping RESERVE_S for the plots and the summary; a step with less than
# a minute left is skipped and reported, so a short budget never loses the results already written.
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
budget=${SUITE_BUDGET_S:-570}
reserve=${RESERVE_S:-25}
deadline=$((SECONDS + budget))
if [ -n "${OUT:-}" ] && [ -z "${GPU_SUITE_LOGGING:-}" ]; then  # the whole log to $OUT too, complete at exit
  GPU_SUITE_LOGGING=1 bash "$self" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
  exit "${PIPESTATUS[0]}"
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== install (builds the CUDA extension with nvcc; $(nproc) jobs)"
build_start=$SECONDS
status=0
# The CUDA top-k tests and benchmark must exercise the compiled kernel, not the torch fallback; without it
# the suite still runs everything else (the Triton kernels and the benchmarks need no extension).
cuda_extension=1
if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} SELFREPLAY_FAST_REQUIRE_EXTENSION=1 \
     python3 -m pip install --no-index --no-deps --no-build-isolation -e . > /tmp/build.log 2>&1; then
  tail -n 40 /tmp/build.log
  echo "!! the extension did not build (above): installing without it; the top-k step and tests are skipped"
  SELFREPLAY_FAST_NO_EXTENSION=1 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "install failed"; exit 1; }
  cuda_extension=0; status=1
elif ! python3 -c "from selfreplay_fast import _C; assert _C.has_cuda(), 'extension built without CUDA'; print('extension with CUDA: ok')"; then
  echo "!! the extension has no CUDA kernel: the top-k step and tests are skipped"
  cuda_extension=0; status=1
fi
echo "installed in $((SECONDS - build_start)) s"
# pytest-xdist (on the GPU image) spreads the Triton compilations of the tests over the CPU cores.
xdist=$(python3 -c "import xdist" >/dev/null 2>&1 && echo "-n 8" || true)

collect() {  # results so far to $OUT (at most 8 files come back: the log plus the 7 results)
  if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json benchmarks/results/*cuda*.png "$OUT"/ 2>/dev/null || true; fi
}

step() {  # step NAME CAP_SECONDS COMMAND...
  local name=$1 cap=$2; shift 2
  local left=$((deadline - SECONDS - reserve))
  echo; echo "== $name"
  if [ "$left" -lt 60 ]; then echo "!! skipped: ${left} s left of SUITE_BUDGET_S=${budget}"; status=1; return; fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ]; then echo "!! timed out after ${limit} s: $*"; status=1
  elif [ "$rc" -ne 0 ]; then echo "!! failed (exit $rc): $*"; status=1
  else echo "-- done in $((SECONDS - start)) s"; fi
  collect
}
steps=${*:-tests kl topk generate planner}
for name in $steps; do
  case $name in
    tests) topk_tests=$([ "$cuda_extension" = 1 ] && echo tests/test_topk_logprobs.py || true)
           step "correctness on the GPU" 240 python3 -m pytest -q --maxfail=1 $xdist tests/test_replay_kl.py \
             tests/test_vocab_pass_kernels.py $topk_tests ;;
    # The headline N=8192 first (and fused_triton, bare_matmuls first within it): the cap drops small rows, not it.
    kl) step "KL benchmark (Llama-3-8B head, bf16)" 140 python3 -m benchmarks.bench_kl --device cuda --repeats 5 \
          --tokens 8192,4096,2048 ;;
    topk) if [ "$cuda_extension" = 1 ]; then
            step "top-k benchmark" 40 python3 -m benchmarks.bench_topk --device cuda --out benchmarks/results/topk_cuda.json
          else echo; echo "== top-k benchmark"; echo "!! skipped: no CUDA extension"; fi ;;
    # --no-vllm: a vLLM engine's start-up (CUDA graphs) must not push the HF/native numbers past the cap;
    # the vLLM row is its own step, not in the default list (the GPU image may have no vLLM).
    generate) step "generation benchmark (1B Llama-shaped)" 140 python3 -m benchmarks.bench_generate --device cuda \
                --speculative --repeats 3 --no-vllm --out benchmarks/results/generate_cuda_batch256.json ;;
    vllm) step "generation benchmark with the vLLM row (1B Llama-shaped)" 240 python3 -m benchmarks.bench_generate \
            --device cuda --repeats 3 --out benchmarks/results/generate_cuda_vllm_batch256.json ;;
    planner) step "memory planner against max_memory_allocated" 120 python3 -m benchmarks.validate_planner ;;
    *) echo "unknown step: $name (tests, kl, topk, generate, planner, vllm)"; exit 2 ;;
  esac
done
echo
python3 -c "from benchmarks import plots; print(*plots.render_all('cuda'), sep='\n')" || status=1
echo; python3 -m benchmarks.summary --device cuda
collect
echo "suite finished in $SECONDS s (budget ${budget} s), status $status"
exit $status
