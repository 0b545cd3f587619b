"""Run Snakemake on this workflow in a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"


def write_config(directory: Path, config: dict) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_snakemake(directory: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``snakemake -s Snakefile --directory directory ARGS``, without the local profile."""
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(directory),
        "--workflow-profile", "none", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def run_workflow(directory: Path, config: dict, *targets: str, timeout: float = 900) -> Path:
    """Write ``config`` and run the workflow to ``targets`` (default: the end) on 2 cores, as a
    user would; fails the test with the ends of its output if the run fails."""
    write_config(directory, config)
    proc = run_snakemake(directory, "--cores", "2", *targets, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return directory


def one_stage_config() -> dict:
    """A fresh config of the quickest whole run: one simulated 24-px set of 300 particles, one
    40 A stage of 3 iterations, one seed (dataset ``t``)."""
    return {
        "datasets": {"t": {"simulate": {"box": 24, "pixel_size": 5.0, "n_particles": 300,
                                        "snr": 0.5, "seed": 3}}},
        "preprocess": {"n_heldout": 30},
        "reconstruction": {"stages_A": [40], "seeds": [1], "minibatch_size": 90,
                           "max_iterations": 3, "min_iterations": 1, "heldout_every": 3},
    }
