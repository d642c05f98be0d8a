#!/usr/bin/env bash
# The main job on a fresh machine: installs what it needs (cached outside the repo), then runs
# the local lab (`vmthunder demo`). Arguments go to `vmthunder demo`, e.g. --nodes 8.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
./scripts/build-tools.sh
venv=$(./scripts/setup-python.sh)
export PATH=${VMT_CACHE:-$HOME/.cache/vmthunder}/bin:$venv/bin:$PATH
exec "$venv/bin/vmthunder" demo "$@"
