"""A tiny ab initio run through Snakemake, as a user runs it (minutes, marked slow)."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile

from cryoday.align import fsc_after_alignment
from cryoday.fourier import rescale_volume
from workflow_helpers import run_snakemake, write_config

TINY = {
    "datasets": {
        "tiny": {
            "simulate": {
                "box": 32,
                "pixel_size": 5.0,
                "n_particles": 400,
                "snr": 0.5,
                "seed": 3,
            }
        }
    },
    "preprocess": {"n_heldout": 40},
    "reconstruction": {
        "stages_A": [40, 25],
        "seeds": [1],
        "minibatch_size": 60,
        "max_iterations": 40,
        "heldout_every": 5,
    },
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    write_config(workdir, TINY)
    proc = run_snakemake(workdir, "--cores", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir


@pytest.mark.slow
def test_tiny_run_writes_every_output(tiny_run):
    results = tiny_run / "results" / "tiny"
    for path in ("final/volume.mrc", "final/particles.star", "validation/metrics.json",
                 "report.html", "preprocess/particles.star", "simulated/truth.mrc"):
        assert (results / path).is_file(), path
    with mrcfile.open(results / "final/volume.mrc") as mrc:
        assert mrc.data.shape == (32, 32, 32)
        assert float(mrc.voxel_size.x) == pytest.approx(5.0)
    star = starfile.read(results / "final/particles.star")
    particles = star["particles"] if isinstance(star, dict) else star
    assert len(particles) == 400
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                   "rlnOriginYAngst"):
        assert np.isfinite(particles[column]).all()
    metrics = json.loads((results / "validation/metrics.json").read_text())
    assert [s["resolution_A"] for s in metrics["stages"]] == [40, 25]
    for stage in metrics["stages"]:
        assert stage["iterations"] >= 1 and stage["wall_s"] > 0


@pytest.mark.slow
def test_tiny_run_recovers_the_molecule_far_better_than_the_random_start(tiny_run):
    results = tiny_run / "results" / "tiny"
    truth = mrcfile.read(results / "simulated/truth.mrc")
    final = mrcfile.read(results / "final/volume.mrc")
    with mrcfile.open(results / "abinitio/seed1/stage1/initial.mrc") as mrc:
        start = rescale_volume(mrc.data.copy(), float(mrc.voxel_size.x), 32, 5.0)
    _, _, fsc_final, _ = fsc_after_alignment(final, truth, 5.0)
    _, _, fsc_start, _ = fsc_after_alignment(start, truth, 5.0)
    # Mean FSC over the shells from 60 A to 30 A: finer than any blob-like start matches by
    # chance, inside the last stage's 25 A limit.
    freq = np.arange(len(fsc_final)) / (32 * 5.0)
    band = (freq >= 1 / 60) & (freq <= 1 / 30)
    assert fsc_final[band].mean() > 0.75
    assert fsc_final[band].mean() > fsc_start[band].mean() + 0.25
