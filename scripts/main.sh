#!/usr/bin/env bash
# The main job on the embedded default model: install, index a folder, search it.
#   bash scripts/main.sh [FOLDER] [QUERY_IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
folder="${1:-../shared/datasets/clothing-small}"
export LOOKALIKE_COLLECTION="${LOOKALIKE_COLLECTION:-$PWD/.lookalike/demo}"
metadata=()
[ -f "$folder/labels.csv" ] && metadata=(--metadata "$folder/labels.csv")
lookalike index "$folder" "${metadata[@]}"
query="${2:-$(find "$folder" -type f \( -iname '*.jpg' -o -iname '*.png' \) | sort | head -n 1)}"
echo "query: $query"
lookalike search "$query" -k 5
lookalike info
