#!/usr/bin/env bash
# Install lookalike and its dependencies into the current Python (idempotent).
# torch is pinned to the CPU build; installing it first keeps pip from pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check -e ".${1:-}"
