#!/usr/bin/env bash
# Generates the Python gRPC stubs of the CSI spec into csi/vmthunder/csi/proto/ (git-ignored),
# from the csi.proto that scripts/build-tools.sh caches. The proto is placed under
# vmthunder/csi/proto/ in a scratch include root, so protoc writes package-qualified imports
# (`from vmthunder.csi.proto import csi_pb2`) instead of a top-level `import csi_pb2`.
# Usage: gen-csi-stubs.sh [python]   (a python with grpcio-tools; default: the project venv)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VMT_CACHE:-$HOME/.cache/vmthunder}
python=${1:-$CACHE/venv/bin/python}
proto=$CACHE/csi-spec/csi.proto
[ -f "$proto" ] || "$top/scripts/build-tools.sh" csi-proto
out=$top/csi/vmthunder/csi/proto
stamp=$(cat "$proto" "$0" | sha256sum | cut -c1-16)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then exit 0; fi
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src/vmthunder/csi/proto" "$scratch/out"
cp "$proto" "$scratch/src/vmthunder/csi/proto/csi.proto"
(cd "$scratch/src" && "$python" -m grpc_tools.protoc -I. --python_out="$scratch/out" \
  --grpc_python_out="$scratch/out" --pyi_out="$scratch/out" vmthunder/csi/proto/csi.proto)
grep -q '^from vmthunder.csi.proto import csi_pb2' "$scratch/out/vmthunder/csi/proto/csi_pb2_grpc.py"
rm -rf "$out"; mkdir -p "$out"
cp "$scratch"/out/vmthunder/csi/proto/csi_pb2* "$out/"
printf '"""Generated from the CSI spec csi.proto by scripts/gen-csi-stubs.sh; not committed."""\n' \
  > "$out/__init__.py"
echo "$stamp" > "$out/.stamp"
