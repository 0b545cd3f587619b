"""A tiny K = 2 run through Snakemake, as a user runs it: two molecules 50/50 sorted apart."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile

from cryoday import records
from workflow_helpers import run_workflow

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
    return run_workflow(tmp_path_factory.mktemp("two_class_run"), TWO)


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


@pytest.mark.slow
def test_each_class_gets_its_map_its_particles_and_its_verdict(two_class_run):
    final = two_class_run / "results/two/final"
    table = starfile.read(final / "particles.star")["particles"]
    assert set(table["rlnClassNumber"]) == {1, 2}
    assert table["rlnMaxValueProbDistribution"].between(0.5, 1.0).all()
    sizes = []
    for k in (1, 2):
        with mrcfile.open(final / f"class{k}/volume.mrc") as f:
            assert f.data.shape == (32, 32, 32)
            assert float(f.voxel_size.x) == pytest.approx(5.0)
        mine = starfile.read(final / f"class{k}/particles.star")["particles"]
        assert (table.loc[table["rlnClassNumber"] == k, "rlnImageName"].str.split("@").str[0]
                .astype(int).tolist() == mine["rlnImageName"].str.split("@").str[0]
                .astype(int).tolist())
        sizes.append(len(mine))
    assert sum(sizes) == len(table)
    metrics = json.loads((two_class_run / "results/two/validation/metrics.json").read_text())
    section = metrics["classes"]
    # Both classes are molecules (neither is junk), and they are not the same molecule.
    assert [c["junk"] for c in section["classes"]] == [False, False]
    assert not section["agreement"]["pairs"]["1-2"]["same_molecule"]
    confusion = np.array(section["confusion"]["map"] + section["confusion"]["other_map"])
    assert confusion.reshape(2, 2).max(axis=1).sum() >= 0.9 * len(table)
    report = (two_class_run / "results/two/report.html").read_text()
    assert "<h3>class 1" in report and "<h3>class 2" in report
