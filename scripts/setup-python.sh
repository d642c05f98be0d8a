#!/usr/bin/env bash
# Creates the project's Python environment outside the repo, keyed by pyproject.toml's hash and
# the checkout's path (the project is installed editable: a venv shared by two checkouts would
# run the first one's code in the second's tests), and generates the CSI stubs from the spec's
# csi.proto. Prints the venv path. Idempotent.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VMT_CACHE:-$HOME/.cache/vmthunder}
key=$({ echo "$top"; cat "$top/pyproject.toml"; } | sha256sum | cut -c1-12)
venv=$CACHE/venv-$key
if [ ! -x "$venv/bin/vmthunder" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -e "$top[dev]" >&2
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$CACHE/venv"
"$top/scripts/gen-csi-stubs.sh" "$venv/bin/python" >&2
echo "$venv"
