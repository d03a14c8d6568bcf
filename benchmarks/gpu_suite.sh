#!/usr/bin/env bash
# Everything a GPU session should run, from the repository root on the GPU machine:
#   bash benchmarks/gpu_suite.sh                    # all steps, about 10 minutes
#   bash benchmarks/gpu_suite.sh tests kl           # a subset, to split the work over device calls
# Steps: tests (kernel correctness on the GPU: Triton vocabulary passes, fused_replay_kl against the
# float64 reference, the CUDA top-k extension), kl (Llama-3-8B head, bf16, against naive PyTorch,
# three bare bf16 matmuls and Liger-Kernel if importable: carry it as wheels, see the device tool's
# README), topk, generate (1B Llama-shaped model, batch 256, speculative at batch 8), planner
# (predicted vs measured peak memory). Then plots and a summary table. Results land in
# benchmarks/results/ (and in $OUT when set, for the device tool to bring back).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
status=0
step() { echo; echo "== $1"; shift; timeout "$@" || { echo "!! failed: $*"; status=1; }; }
steps=${*:-tests kl topk generate planner}
for name in $steps; do
  case $name in
    tests) step "correctness on the GPU" 120 python3 -m pytest -q -x tests/test_replay_kl.py \
             tests/test_vocab_pass_kernels.py tests/test_topk_logprobs.py ;;
    kl) step "KL benchmark (Llama-3-8B head, bf16)" 140 python3 -m benchmarks.bench_kl --device cuda --repeats 5 ;;
    topk) step "top-k benchmark" 40 python3 -m benchmarks.bench_topk --device cuda --out benchmarks/results/topk_cuda.json ;;
    generate) step "generation benchmark (1B Llama-shaped)" 140 python3 -m benchmarks.bench_generate --device cuda \
                --speculative --out benchmarks/results/generate_cuda_batch256.json ;;
    planner) step "memory planner against max_memory_allocated" 120 python3 -m benchmarks.validate_planner ;;
    *) echo "unknown step: $name (tests, kl, topk, generate, planner)"; exit 2 ;;
  esac
done
python3 -c "from benchmarks import plots; print(*plots.render_all('cuda'), sep='\n')" || status=1
echo; python3 -m benchmarks.summary --device cuda
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json benchmarks/results/*cuda*.png "$OUT"/ 2>/dev/null || true; fi  # at most 8 files come back
exit $status
