#!/usr/bin/env bash
# The whole check: stubs current, buf lint clean, then the test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python scripts/gen_protos.py --check
buf lint
python -m pytest "$@"
