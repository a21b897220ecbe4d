#!/usr/bin/env bash
# Install lookalike with its test dependencies, lint, type-check, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[test]"
python3 -m ruff check lookalike tests benchmarks
python3 -m ruff format --check lookalike tests benchmarks
python3 -m mypy
python3 -m pytest -p no:cacheprovider "$@"
