#!/usr/bin/env bash
# The README's main command: set up, then run the tiny curriculum on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/progressive demo "$@"
