#!/usr/bin/env bash
# One command, one table of GPU figures: SD1.5 LoRA it/s, memory and MFU at batch 1/4/8 (and sd-scripts' with
# --sd-scripts DIR), SDXL LoRA peak memory, face training it/s, swap frames/s, tagger images/s. Under 8 minutes on
# one H100 or H200; without a CUDA GPU it says so and exits with status 2, having run nothing.
# Options: bench/gpu_suite.py --help (--sd-scripts DIR, --budget SECONDS, --rows ...). PYTHON=... picks the
# interpreter; by default the repository's .venv when there is one.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" bench/gpu_suite.py "$@"
