#!/usr/bin/env bash
# Regenerate the gRPC Python code in lookalike/server/protos/ from the .proto files there.
#   bash scripts/gen_protos.sh [OUTPUT_FOLDER]    (default: lookalike/server/protos)
# Needs grpcio-tools (pip install "grpcio-tools==1.85.1"); its bundled protoc decides the
# protobuf runtime the generated code needs (see the "Protobuf Python Version" header line),
# and its version is the least grpcio the generated *_pb2_grpc.py accept.
# PYTHON picks the interpreter (default: python3).
#
# The protos are compiled from the repository root, so the generated modules know their
# package: the grpc modules import `from lookalike.server.protos import ..._pb2`, and the
# message classes live in `lookalike.server.protos.*_pb2` (so they pickle). Wire names do
# not depend on it: the classic service stays `/SimilarImage/FindSimilar`.
#
# similar_image_v2.proto (the classic contract's version 2) declares the same service and
# message names as similar_image.proto, so its generated module builds them in a descriptor
# pool of its own instead of protobuf's default pool, where the names would clash and the
# second import would fail ("duplicate symbol"); protoc compiles it on its own for the same
# reason. Its wire names do not change.
set -euo pipefail
if [ -n "${1:-}" ]; then
  mkdir -p "$1"
  out="$(cd "$1" && pwd)"
fi
cd "$(dirname "$0")/.."
protos=lookalike/server/protos
out="${out:-$PWD/$protos}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
compile() {
  "${PYTHON:-python3}" -m grpc_tools.protoc --proto_path=. \
    --python_out="$work" --pyi_out="$work" --grpc_python_out="$work" "$@"
}
compile "$protos"/similar_image.proto "$protos"/lookalike_v1.proto
compile "$protos"/similar_image_v2.proto  # alone: its names are similar_image.proto's
v2="$work/$protos/similar_image_v2_pb2.py"
default='_descriptor_pool.Default().AddSerializedFile('
grep -qF "$default" "$v2" || { echo "gen_protos.sh: no default pool in $v2" >&2; exit 1; }
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' "$v2"
for file in "$work/$protos"/*; do
  # Generated code is neither linted nor reformatted by ruff.
  { printf '# ruff: noqa\n# fmt: off\n'; cat "$file"; } > "$out/$(basename "$file")"
done
