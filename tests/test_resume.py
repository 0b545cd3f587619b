"""A run killed in the middle of a stage resumes from that stage's checkpoint (marked slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from workflow_helpers import SNAKEFILE, write_config

CONFIG = {
    "datasets": {"r": {"simulate": {"box": 32, "pixel_size": 5.0, "n_particles": 300,
                                    "snr": 0.5, "seed": 4}}},
    "preprocess": {"n_heldout": 30},
    "reconstruction": {"stages_A": [40, 25], "seeds": [1], "minibatch_size": 30,
                       "max_iterations": 200, "min_iterations": 200, "heldout_every": 50,
                       "checkpoint_every": 5},
}


def snakemake_cmd(workdir):
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory",
            str(workdir), "--workflow-profile", "none", "--cores", "2", "--rerun-incomplete",
            "results/r/final/volume.mrc"]


@pytest.mark.slow
def test_killed_stage_resumes_from_its_checkpoint(tmp_path):
    write_config(tmp_path, CONFIG)
    stage2 = tmp_path / "results/r/abinitio/seed1/stage2"
    proc = subprocess.Popen(snakemake_cmd(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (stage2 / "checkpoint.npz").exists():
        assert proc.poll() is None, "the run ended before stage 2 checkpointed"
        assert time.time() < deadline, "stage 2 never checkpointed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # as a cluster's time limit or a power cut would
    proc.wait()
    stage1_volume = tmp_path / "results/r/abinitio/seed1/stage1/volume.mrc"
    assert stage1_volume.exists() and not (stage2 / "volume.mrc").exists()
    stage1_mtime = stage1_volume.stat().st_mtime

    # A killed Snakemake cannot remove its lock; the user clears it as Snakemake's message says.
    unlock = subprocess.run(snakemake_cmd(tmp_path) + ["--unlock"], capture_output=True,
                            text=True, timeout=120)
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    rerun = subprocess.run(snakemake_cmd(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (tmp_path / "logs/reconstruct_stage/r_seed1_stage2.log").read_text()
    assert "resuming from checkpoint" in log
    assert "starting the stage afresh" not in log, "the rerun's own checkpoint did not fit it"
    assert stage1_volume.stat().st_mtime == stage1_mtime, "the finished stage 1 was rerun"
    assert (tmp_path / "results/r/final/volume.mrc").exists()
    assert not (stage2 / "checkpoint.npz").exists(), "a finished stage removes its checkpoint"
