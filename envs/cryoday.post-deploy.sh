#!/usr/bin/env bash
# Snakemake unsets PYTHONPATH inside conda envs, so the engine must be installed into the env.
# The repository is found from this script's own location (envs/ sits at its root).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python -m pip install --no-deps "$repo"
