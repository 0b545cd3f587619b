"""A tiny K = 2 run through Snakemake, as a user runs it: two molecules 50/50 sorted apart."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from cryoday import records
from workflow_helpers import run_snakemake, write_config

TWO = {
    "datasets": {
        "two": {
            "classes": 2,
            "simulate": {"box": 32, "pixel_size": 5.0, "n_particles": 600, "snr": 0.5,
                         "seed": 3, "junk_fraction": 0.5, "junk_kind": "other_map"},
        }
    },
    "preprocess": {"n_heldout": 60},
    "reconstruction": {"stages_A": [40, 25], "seeds": [1], "minibatch_size": 60,
                       "max_iterations": 40, "heldout_every": 5},
}


@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_class_run")
    write_config(workdir, TWO)
    proc = run_snakemake(workdir, "--cores", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir


def _truth_kinds(workdir):
    """0: the first molecule, 2: the other (the simulation's junk column)."""
    table = starfile.read(workdir / "results/two/simulated/particles.star")
    table = table["particles"] if isinstance(table, dict) else table
    return table["cryodaySimJunk"].to_numpy()


@pytest.mark.slow
def test_two_molecules_are_sorted_into_two_classes(two_class_run):
    kinds = _truth_kinds(two_class_run)
    stage = two_class_run / "results/two/abinitio/seed1/stage2"
    posterior = records.class_posterior(records.read_poses(stage / "poses.npz"))
    assert posterior.shape == (len(kinds), 2)
    assigned = np.argmax(posterior, axis=1)
    molecule = kinds == 0
    # Which class took which molecule is arbitrary: the better matching.
    agreement = max(np.mean(assigned == np.where(molecule, 0, 1)),
                    np.mean(assigned == np.where(molecule, 1, 0)))
    assert agreement >= 0.9, agreement
    saved = records.read_classes(stage / "classes.npz")
    assert saved["volumes"].shape == (2, 18, 18, 18)
    assert np.all(saved["proportions"] > 0.35), saved["proportions"]
    # The stage's map is its main class's.
    with mrcfile.open(stage / "volume.mrc") as f:
        np.testing.assert_array_equal(f.data, saved["volumes"][saved["main"]])
