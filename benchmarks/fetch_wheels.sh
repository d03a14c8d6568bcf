#!/usr/bin/env bash
# Run here (with the package registry), before a GPU session: downloads the wheels the GPU machine lacks
# into .whl/ (git-ignored), for the device tool to carry (`carry: [".whl"]`); gpu_suite.sh installs
# them. Today that is Liger-Kernel alone (pure Python; torch and triton are on the GPU image), the
# baseline of benchmarks/bench_kl.py. The GPU image runs Python 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
LIGER_VERSION=${LIGER_VERSION:-0.8.5}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel==${LIGER_VERSION}"
ls -l .whl
