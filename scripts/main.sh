#!/usr/bin/env bash
# The main job on the embedded default model: install, index a folder, search it once, then
# serve the web page and REST API on http://127.0.0.1:8000 (Ctrl+C stops it).
#   bash scripts/main.sh [FOLDER] [QUERY_IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
folder="${1:-../shared/datasets/clothing-small}"
query="${2:-}"
if [ -z "$query" ]; then
  # The first image in sorted order. Not `find | sort | head -n 1`: head exits after one line,
  # so on a large folder sort dies of SIGPIPE and pipefail stops the script (status 141).
  images="$(find "$folder" -type f \( -iname '*.jpg' -o -iname '*.png' \) | sort)"
  query="${images%%$'\n'*}"
  [ -n "$query" ] || { echo "main.sh: no .jpg or .png image in $folder" >&2; exit 1; }
fi
export LOOKALIKE_COLLECTION="${LOOKALIKE_COLLECTION:-$PWD/.lookalike/demo}"
metadata=()
[ -f "$folder/labels.csv" ] && metadata=(--metadata "$folder/labels.csv")
lookalike index "$folder" "${metadata[@]}"
echo "query: $query"
lookalike search "$query" -k 5
lookalike info
lookalike serve --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
