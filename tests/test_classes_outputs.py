"""The outputs of a run of K classes: the particles' class columns, each class's map and STAR,
``classes.json``, validation's ``classes`` section and the report's section per class.

Each case is a small fake finished run on disk (16 px, 60 simulated particles of which a third
is junk: pure noise and another molecule's projections) whose stage records (``poses.npz``
with ``class_posterior``, ``classes.npz``) are written by ``cryoday.records`` as the engine
would write them; nothing here trains a map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryoday import class_results, cryosparc, finalize, io, molecule, records, report, simulate
from cryoday.simulate import JUNK_COLUMN, JUNK_NOISE, JUNK_NONE, JUNK_OTHER

BOX, PIXEL, N = 16, 6.0, 60
# The last stage at Nyquist (2 x 6 A): "one molecule" then means FSC 0.5 finer than 24 A, which
# the truth against itself turned (15 A after the alignment's resampling at 16 px) meets and
# the other molecule (38 A) does not.
STAGES_A = [30.0, 12.0]
HELDOUT = np.arange(0, N, 2)  # every other particle held out: each class has some


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Simulated particles with a third junk (half noise, half another map) in ``data/``, as a
    user's STAR beside its stack; the truth map and the other map."""
    root = tmp_path_factory.mktemp("sim")
    truth = molecule.synthetic_molecule(BOX, PIXEL)
    other = molecule.other_molecule(BOX, PIXEL, seed=3)
    images, table = next(simulate.simulate_chunks(
        truth, PIXEL, N, snr=1.0, seed=4, junk_fraction=1 / 3, junk_kind="mixed",
        junk_volume=other))
    (root / "data").mkdir()
    with io.StackWriter(root / "data" / "particles.mrcs", N, BOX, PIXEL) as writer:
        writer.data[:] = images
    table["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(N)]
    optics = simulate.optics_table(PIXEL, BOX, 300.0, 2.7, 0.1)
    io.write_particles(root / "data" / "particles.star", table, optics)
    info = {"n_particles": N, "n_heldout": len(HELDOUT), "box": BOX, "pixel_size": PIXEL,
            "contrast_sign": 1, "contrast_z": 9.0}
    (root / "info.json").write_text(json.dumps(info))
    kinds = table[JUNK_COLUMN].to_numpy()
    assert set(kinds) == {JUNK_NONE, JUNK_NOISE, JUNK_OTHER}
    return {"root": root, "star": root / "data" / "particles.star", "info": root / "info.json",
            "truth": truth, "other": other, "kinds": kinds, "table": table}


def class_run(root: Path, sim, k: int, *, main_junk: bool = False) -> dict:
    """A fake finished start (seed 1, two stages) of ``k`` classes: class 1 holds the molecule's
    particles, class 2 the noise images, class 3 (``k = 3``) the other map's. Held-out gains
    (null_nll - nll) are ~5 nats for images with a structure and ~0 for noise; with
    ``main_junk`` the noise class is the largest (the main class)."""
    rng = np.random.default_rng(7)
    kinds = sim["kinds"]
    true_class = {JUNK_NONE: 0, JUNK_NOISE: 1, JUNK_OTHER: 2 if k == 3 else 0}
    assigned = np.array([true_class[v] for v in kinds])
    posterior = np.full((N, k), 0.1 / (k - 1), np.float32) if k > 1 else np.ones((N, 1))
    if k > 1:
        posterior[np.arange(N), assigned] = 0.9
    nll = 1000.0 + rng.standard_normal(N)
    gain = np.where(kinds == JUNK_NOISE, 0.02 * rng.standard_normal(N) - 0.01,
                    5.0 + rng.standard_normal(N))
    null_nll = nll + gain
    volumes = [sim["truth"], 0.01 * rng.standard_normal((BOX,) * 3), sim["other"]][:k]
    proportions = np.bincount(assigned, minlength=k) / N if k > 1 else np.ones(1)
    if main_junk:
        proportions = np.array([0.2, 0.7, 0.1][:k])
    main = int(np.argmax(proportions))
    stage_classes = []
    for stage in (1, 2):
        d = root / "seed1" / f"stage{stage}"
        d.mkdir(parents=True)
        rows = [{"iteration": i, "epoch": 0.5 * i, "objective": 10.0 - i,
                 "heldout_nll": 9.0 - 0.1 * i, "eps": 0.1, "L": 1.0, "step": 0.1,
                 "wall_s": float(i), "n_evaluated": 10, "n_full": 100} for i in range(1, 4)]
        records.write_history(d / "history.tsv", rows)
        io.write_map(d / "volume.mrc", np.asarray(volumes[main], np.float32), PIXEL)
        history = np.linspace(np.full(k, 1 / k), proportions, 3)
        records.write_classes(d / "classes.npz", np.asarray(volumes, np.float32), proportions,
                              PIXEL, history)
        stage_classes.append(d / "classes.npz")
    rotations = simulate.random_rotations(N, np.random.default_rng(1))
    records.write_poses(d / "poses.npz", rotations, rng.normal(0, 2, (N, 2)), nll, null_nll,
                        HELDOUT, class_posterior=posterior if k > 1 else None)
    return {"history": d / "history.tsv", "volume": d / "volume.mrc", "poses": d / "poses.npz",
            "classes": d / "classes.npz", "stage_classes": stage_classes, "assigned": assigned,
            "main": main}


def run_finalize(tmp_path, sim, run):
    out = tmp_path / "final"
    out.mkdir()
    finalize.finalize([run["history"]], [run["volume"]], [run["poses"]], sim["star"],
                      sim["info"], out / "volume.mrc", out / "particles.star",
                      out / "particles.cs", out / "seed_choice.json", seeds=[1])
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_finalize_gives_each_particle_its_class_and_posterior(tmp_path, sim, k):
    run = class_run(tmp_path, sim, k)
    out = run_finalize(tmp_path, sim, run)
    table = starfile.read(out / "particles.star")["particles"]
    np.testing.assert_array_equal(table["rlnClassNumber"], run["assigned"] + 1)
    np.testing.assert_allclose(table["rlnMaxValueProbDistribution"], 0.9, rtol=1e-6)
    cs = cryosparc.load_cs(out / "particles.cs")
    np.testing.assert_array_equal(cs["alignments3D/class"], run["assigned"])
    np.testing.assert_allclose(cs["alignments3D/class_posterior"], 0.9, rtol=1e-6)


def test_one_class_adds_no_class_columns(tmp_path, sim):
    run = class_run(tmp_path, sim, 1)
    out = run_finalize(tmp_path, sim, run)
    table = starfile.read(out / "particles.star")["particles"]
    assert "rlnClassNumber" not in table and "rlnMaxValueProbDistribution" not in table
    np.testing.assert_allclose(cryosparc.load_cs(out / "particles.cs")
                               ["alignments3D/class_posterior"], 1.0)


def test_each_class_gets_its_map_and_a_star_relion_can_read(tmp_path, sim):
    run = class_run(tmp_path, sim, 3)
    out = run_finalize(tmp_path, sim, run)
    sizes = []
    for k in (1, 2, 3):
        folder = out / f"class{k}"
        folder.mkdir()
        n = finalize.class_outputs(k, [run["classes"]], out / "seed_choice.json",
                                   out / "particles.star", sim["info"], folder / "volume.mrc",
                                   folder / "particles.star", seeds=[1])
        sizes.append(n)
        table = starfile.read(folder / "particles.star")["particles"]
        assert len(table) == n == int((run["assigned"] == k - 1).sum())
        assert (table["rlnClassNumber"] == k).all()
        # The image names find the stacks from the class's folder: read back with the stacks
        # checked, each image is the source's.
        particles = io.read_particles(folder / "particles.star")
        rows = np.flatnonzero(run["assigned"] == k - 1)
        with io.ImageSource(particles) as source, \
                io.ImageSource(io.read_particles(sim["star"])) as original:
            np.testing.assert_array_equal(source.read(np.arange(n)), original.read(rows))
        volume, voxel = io.read_map(folder / "volume.mrc")
        assert volume.shape == (BOX,) * 3 and voxel == pytest.approx(PIXEL)
        expected = finalize.to_input_box(records.read_classes(run["classes"])["volumes"][k - 1],
                                         PIXEL, BOX, PIXEL)
        np.testing.assert_allclose(volume, expected, atol=1e-6)
    assert sum(sizes) == N


def test_class_summary_names_the_main_class_and_the_junk(tmp_path, sim):
    run = class_run(tmp_path, sim, 3)
    summary = class_results.write_class_summary(tmp_path / "classes.json", run["poses"],
                                                run["classes"], seed=1)
    assert json.loads((tmp_path / "classes.json").read_text()) == json.loads(
        json.dumps(summary))
    classes = summary["classes"]
    assert summary["main"] == 1 and classes[0]["main"] and not classes[1]["main"]
    assert [c["size"] for c in classes] == np.bincount(run["assigned"], minlength=3).tolist()
    np.testing.assert_allclose([c["posterior_mass"] for c in classes],
                               records.class_posterior(records.read_poses(run["poses"]))
                               .sum(axis=0), rtol=1e-5)
    # The noise class's held-out images gain nothing over empty density: junk. The other
    # molecule's class holds a structure, so it is not junk by this test.
    assert [c["junk"] for c in classes] == [False, True, False]
    assert "no evidence of a structure" in classes[1]["junk_reason"]


def test_junk_verdict_of_an_empty_class_and_one_without_heldout_images():
    assert class_results.junk_verdict(0, None)[0] is True
    assert class_results.junk_verdict(5, None)[0] is None


def test_confusion_table_counts_each_kind_per_class():
    kinds = np.array([0, 0, 0, 1, 1, 2, 0])
    assigned = np.array([0, 0, 2, 1, 1, 2, 0])
    table = class_results.confusion_table(kinds, assigned, 3)
    assert table == {"map": [3, 0, 1], "noise": [0, 2, 0], "other_map": [0, 0, 1]}
    # Class 3 holds one of the map's particles and one other map's: not a majority.
    assert class_results.molecule_classes(table) == [0]


def test_validation_class_section_on_a_simulation(tmp_path, sim):
    run = class_run(tmp_path, sim, 3)
    io.write_map(tmp_path / "truth.mrc", sim["truth"], PIXEL)
    # The simulation's STAR holds the true poses: the final poses here.
    section, warnings = class_results.class_metrics(
        records.read_poses(run["poses"]), run["stage_classes"], STAGES_A, sim["star"],
        tmp_path / "truth.mrc", BOX, PIXEL, preprocessed_star=sim["star"],
        final_star=sim["star"], log=lambda _: None)
    assert warnings == []  # a junk class is what classes are for
    # Half maps per class: the molecule's 40 particles at their true poses resolve it; the
    # 10 noise images hold nothing to resolve.
    halfmaps = [c["halfmap_fsc0143_masked_A"] for c in section["classes"]]
    assert halfmaps[0] < 30.0 and not halfmaps[1] < 2 * halfmaps[0]
    assert section["n_classes"] == 3 and section["main"] == 1 and section["junk"] == [2]
    kinds = sim["kinds"]
    assert section["confusion"] == {
        "map": [int((kinds == JUNK_NONE).sum()), 0, 0],
        "noise": [0, int((kinds == JUNK_NOISE).sum()), 0],
        "other_map": [0, 0, int((kinds == JUNK_OTHER).sum())]}
    assert section["molecule_classes"] == [1]
    molecule_class = section["classes"][0]
    # The class map is the truth: its FSC 0.5 against it is as good as the alignment's
    # resampling allows at 16 px (15 A; the other molecule's is 38 A).
    assert molecule_class["fsc05_vs_truth_A"] < 20.0
    assert "fsc05_vs_truth_A" not in section["classes"][1]
    assert len(section["proportions_by_stage"]) == 2
    np.testing.assert_allclose(section["proportions_by_stage"][-1],
                               np.bincount(run["assigned"], minlength=3) / N)
    # Three different maps (a molecule, noise, another molecule): no pair is one molecule.
    assert set(section["agreement"]["pairs"]) == {"1-2", "1-3", "2-3"}
    assert not any(p["same_molecule"] for p in section["agreement"]["pairs"].values())


def test_two_classes_of_one_molecule_are_said_to_be_the_same(sim):
    rotated = np.rot90(sim["truth"], 1, axes=(1, 2)).copy()
    agreement = class_results.class_agreement([sim["truth"], rotated, sim["other"]], PIXEL,
                                              STAGES_A[-1])
    assert agreement["pairs"]["1-2"]["same_molecule"]
    assert not agreement["pairs"]["1-3"]["same_molecule"]


def test_a_junk_main_class_is_a_warning(tmp_path, sim):
    run = class_run(tmp_path, sim, 2, main_junk=True)
    section, warnings = class_results.class_metrics(
        records.read_poses(run["poses"]), run["stage_classes"], STAGES_A, log=lambda _: None)
    assert section["main"] == 2 and section["junk"] == [2]
    assert len(warnings) == 1 and "main class (class 2" in warnings[0]
    assert "no evidence of a structure" in warnings[0]


def test_report_has_a_section_per_class(tmp_path, sim):
    run = class_run(tmp_path, sim, 3)
    section, _ = class_results.class_metrics(
        records.read_poses(run["poses"]), run["stage_classes"], STAGES_A, log=lambda _: None)
    page = report.classes_section({"classes": section}, run["stage_classes"])
    for k in (1, 2, 3):
        assert f"<h3>class {k}" in page
    assert "<h3>class 1 (main)</h3>" in page and "<h3>class 2 (junk)</h3>" in page
    assert "Classes that look like junk: 2." in page
    assert 'alt="class proportions"' in page
    assert page.count('alt="class ') >= 1 + 2 * 3  # the plot, and views + surface per class
    # One class: no section.
    assert report.classes_section({}, run["stage_classes"]) == ""


def test_the_main_class_map_weights_each_particle_by_its_posterior(tmp_path, sim):
    # Weights of 0 for the junk and 1 for the molecule's particles: the full map is the one of
    # the molecule's particles alone (its sums hold nothing of the others).
    from cryoday import final_map

    molecule_rows = np.flatnonzero(sim["kinds"] == JUNK_NONE)
    weights = (sim["kinds"] == JUNK_NONE).astype(np.float64)
    outputs = {name: tmp_path / f"{name}.{'json' if name == 'figures' else 'mrc'}"
               for name in ("full", "half1", "half2", "sharpened", "figures")}
    outputs["fsc_table"] = tmp_path / "fsc.tsv"
    figures = final_map.run(preprocessed_star=sim["star"], final_star=sim["star"],
                            outputs=outputs, class_weights=weights, main_class=1,
                            log=lambda *_: None)
    assert figures["class"] == 1 and figures["class_weight_sum"] == len(molecule_rows)
    assert figures["poses"] == "best"
    assert json.loads(outputs["figures"].read_text())["class"] == 1

    particles = io.read_particles(sim["star"])
    pose = io.poses(particles)
    from cryoday.geometry import euler_to_matrix

    rotations = euler_to_matrix(pose["rot"], pose["tilt"], pose["psi"])[molecule_rows]
    shifts = np.stack([pose["shift_x"], pose["shift_y"]], 1)[molecule_rows] / PIXEL
    with io.ImageSource(particles) as source:
        alone = final_map.final_reconstruction(source.read, N, rotations, shifts,
                                               io.ctf_params(particles), PIXEL, BOX,
                                               image=molecule_rows, log=lambda *_: None)
    full, _ = io.read_map(outputs["full"])
    np.testing.assert_allclose(full, alone.full, atol=1e-5 * np.abs(alone.full).max())


def test_a_reference_of_another_class_than_the_main_one_is_no_disagreement():
    from cryoday.validation import _reference_in_another_class

    def metrics(fsc05_other):
        return {"halfmap_fsc0143_masked_A": 10.0, "classes": {"main": 2, "classes": [
            {"class": 1, "main": False, "junk": False, "fsc05_vs_reference_A": fsc05_other,
             "fsc0143_vs_reference_A": 10.5, "halfmap_fsc0143_masked_A": 10.4},
            {"class": 2, "main": True, "junk": False, "fsc05_vs_reference_A": 35.0,
             "fsc0143_vs_reference_A": 14.0},
            {"class": 3, "main": False, "junk": True},
            # A poorer copy of class 1 (the set has a spare class): not the one named.
            {"class": 4, "main": False, "junk": False, "fsc05_vs_reference_A": 19.0,
             "fsc0143_vs_reference_A": 13.5, "halfmap_fsc0143_masked_A": 12.0}]}}

    two_molecules = metrics(12.0)
    assert _reference_in_another_class(two_molecules, [40, 10], log=lambda *_: None)
    assert two_molecules["reference_class"] == 1
    reordered = metrics(12.0)
    reordered["classes"]["classes"].reverse()
    assert _reference_in_another_class(reordered, [40, 10], log=lambda *_: None)
    assert reordered["reference_class"] == 1
    # No class is the reference's structure: the disagreement stands.
    neither = metrics(40.0)
    neither["classes"]["classes"].pop()
    assert not _reference_in_another_class(neither, [40, 10], log=lambda *_: None)
    assert "reference_class" not in neither
