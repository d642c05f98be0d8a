#!/usr/bin/env bash
# Runs every test: installs what they need (cached outside the repo), then pytest.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./scripts/build-tools.sh
venv=$(./scripts/setup-python.sh)
export PATH=${VMT_CACHE:-$HOME/.cache/vmthunder}/bin:$venv/bin:$PATH
exec "$venv/bin/python" -m pytest "$@"
