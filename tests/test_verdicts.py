"""The run's verdict: a collapsed map, a constant held-out gain, uncorrelated half maps or starts
that disagree at the resolution the data support are never "ok"; a genuine run is.

Each case is a small synthetic run on disk (32 px, 100 particles): simulated images with their
true poses, stage records written by ``cryoday.records``, and ``run_metrics`` judging them from
the paths alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryoday import io, molecule, records, simulate, validation

BOX, PIXEL, N = 32, 5.0, 100
STAGES_A = [40.0, 25.0]


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    """Simulated particles at SNR 1 with their true poses, and the truth; also an all-zero copy
    of the stack (images that carry nothing)."""
    root = tmp_path_factory.mktemp("particles")
    truth = molecule.synthetic_molecule(BOX, PIXEL)
    images, table = next(simulate.simulate_chunks(truth, PIXEL, N, snr=1.0, seed=4))
    optics = simulate.optics_table(PIXEL, BOX, 300.0, 2.7, 0.1)
    stars = {}
    for name, data in (("signal", images), ("zeros", np.zeros_like(images))):
        with io.StackWriter(root / f"{name}.mrcs", N, BOX, PIXEL) as writer:
            writer.data[:] = data
        t = table.copy()
        t["rlnImageName"] = [f"{i + 1:06d}@{name}.mrcs" for i in range(N)]
        io.write_particles(root / f"{name}.star", t, optics)
        stars[name] = root / f"{name}.star"
    info = root / "info.json"
    info.write_text(json.dumps({"n_particles": N, "n_heldout": 20, "box": BOX,
                                "pixel_size": PIXEL, "contrast_sign": 1, "contrast_z": 9.0}))
    return {"truth": truth, "stars": stars, "info": info,
            "rotations": simulate.random_rotations(N, np.random.default_rng(1))}


def gains(kind, rng):
    """Held-out gains -log p(I|0) + log p(I|V) of 20 images: genuine ones vary by image."""
    if kind == "genuine":
        return 5.0 + rng.standard_normal(20)
    # A collapsed map's: the same 2e-7 nats on every image, up to float rounding.
    return 2e-7 + 1e-15 * rng.standard_normal(20)


def write_run(root, particles, *, final_map, seed_maps, gain="genuine", images="signal"):
    """A finished run's files, and the arguments ``run_metrics`` takes for them."""
    rng = np.random.default_rng(0)
    seed_stages, seed_poses = {}, {}
    for seed, volume in seed_maps.items():
        stages = []
        for stage in range(1, len(STAGES_A) + 1):
            d = root / f"seed{seed}" / f"stage{stage}"
            d.mkdir(parents=True)
            rows = [{"iteration": i, "epoch": 0.3 * i, "objective": 10.0 - 0.1 * i,
                     "heldout_nll": 9.0 - 0.1 * i if i % 2 else None, "eps": 0.1, "L": 1.0,
                     "step": 0.1, "wall_s": 1.0 + i, "n_evaluated": 100, "n_full": 1000}
                    for i in range(1, 6)]
            records.write_history(d / "history.tsv", rows)
            io.write_map(d / "volume.mrc", volume, PIXEL)
            stages.append((d / "history.tsv", d / "volume.mrc"))
        nll = 1000.0 + rng.standard_normal(N)
        heldout = np.arange(20)
        null_nll = nll.copy()
        null_nll[heldout] += gains(gain, rng)
        records.write_poses(d / "poses.npz", particles["rotations"], np.zeros((N, 2)), nll,
                            null_nll, heldout)
        seed_stages[seed], seed_poses[seed] = stages, d / "poses.npz"
    io.write_map(root / "final.mrc", final_map, PIXEL)
    chosen = next(iter(seed_maps))
    (root / "seed_choice.json").write_text(json.dumps({"chosen_seed": chosen}))
    star = particles["stars"][images]
    return {"dataset": "test", "final_volume": root / "final.mrc", "final_star": star,
            "seed_choice": root / "seed_choice.json", "preprocess_info": particles["info"],
            "preprocessed_star": star, "seed_stages": seed_stages, "seed_poses": seed_poses,
            "stages_A": STAGES_A, "log": lambda _: None}


def noisy(volume, level, seed):
    rng = np.random.default_rng(seed)
    return (volume + level * volume.std() * rng.standard_normal(volume.shape)).astype(np.float32)


def test_a_genuine_run_is_ok_and_its_starts_agree(particles, tmp_path):
    truth = particles["truth"]
    args = write_run(tmp_path, particles, final_map=truth,
                     seed_maps={1: truth, 2: noisy(truth, 0.05, 1)})
    metrics, table = validation.run_metrics(**args)
    assert metrics["status"] == "ok", metrics["warnings"]
    assert metrics["heldout_signal"]["evidence"] and metrics["heldout_signal"]["z"] > 10
    assert np.isfinite(metrics["halfmap_fsc0143_A"]) and not metrics["map_collapsed"]
    consistency = metrics["seed_consistency"]
    assert consistency["agree"] and consistency["max_ratio"] == validation.SEED_AGREEMENT_FACTOR
    assert consistency["pairwise_fsc0143_A"]["1-2"] <= consistency["threshold_A"]
    assert [len(s) for s in metrics["seeds"].values()] == [2, 2]
    assert len(table["freq_invA"]) == BOX // 2 + 1


def test_a_zero_map_is_a_warning(particles, tmp_path):
    zero = np.zeros((BOX,) * 3, np.float32)
    args = write_run(tmp_path, particles, final_map=zero, seed_maps={1: zero})
    metrics, _ = validation.run_metrics(**args)
    assert metrics["status"] == "warning" and metrics["map_collapsed"]
    assert any("the map is constant" in w for w in metrics["warnings"]), metrics["warnings"]


@pytest.mark.parametrize(("volume", "expected"), [
    (np.zeros((BOX,) * 3), "constant"),
    (np.full((BOX,) * 3, 3.5), "constant"),
    # Structure, but a million times too faint for any image to notice.
    (1e-6 * molecule.synthetic_molecule(BOX, PIXEL), "nearly empty"),
    (np.full((BOX,) * 3, np.nan), "non-finite"),
])
def test_maps_without_structure_are_named(volume, expected):
    assert expected in validation.map_collapse(volume)


def test_a_real_map_is_not_collapsed(particles):
    assert validation.map_collapse(particles["truth"]) is None
    # Faint but real: the projection of a map at 1% of the truth's scale still varies by far
    # more than the threshold.
    assert validation.map_collapse(0.01 * particles["truth"]) is None


def test_a_constant_heldout_gain_is_no_evidence(particles, tmp_path):
    truth = particles["truth"]
    args = write_run(tmp_path, particles, final_map=truth, seed_maps={1: truth}, gain="constant")
    metrics, _ = validation.run_metrics(**args)
    signal = metrics["heldout_signal"]
    # Unguarded, mean / standard error would be ~1e9 here.
    assert signal["z"] == 0.0 and not signal["evidence"]
    assert "same for every image" in signal["reason"]
    assert metrics["status"] == "warning"
    warning = next(w for w in metrics["warnings"] if "no evidence of a structure" in w)
    assert "same for every image" in warning


def test_a_gain_below_the_likelihoods_precision_is_no_evidence():
    rng = np.random.default_rng(2)
    nll = 1000.0 + rng.standard_normal(50)
    poses = {"nll": nll, "null_nll": nll + 2e-7 + 1e-10 * rng.standard_normal(50),
             "heldout_rows": np.arange(50)}
    signal = validation.heldout_signal_test(poses)
    assert not signal["evidence"] and signal["z"] == 0.0 and "precision" in signal["reason"]
    poses["null_nll"] = nll + 0.5 + rng.standard_normal(50)
    signal = validation.heldout_signal_test(poses)
    assert signal["evidence"] and signal["reason"] is None and signal["z"] > 3


def test_half_maps_that_never_correlate_are_a_warning(particles, tmp_path):
    # Images that carry nothing give empty half maps: FSC 0 from the first shell, resolution inf.
    truth = particles["truth"]
    args = write_run(tmp_path, particles, final_map=truth, seed_maps={1: truth}, images="zeros")
    metrics, _ = validation.run_metrics(**args)
    assert metrics["halfmap_fsc0143_A"] == np.inf
    assert metrics["status"] == "warning"
    assert any("half maps do not correlate" in w for w in metrics["warnings"]), metrics
    # A seed check can never pass against an infinite reference: it falls back on the last stage.
    assert metrics["seed_consistency"]["reference_A"] == STAGES_A[-1]


def test_starts_agreeing_to_17_A_with_half_maps_at_10_7_A_disagree():
    # Issue 14's measurement: the old rule (within 2 x the last stage's 10 A) called this "agree".
    verdict = validation.seed_agreement({"1-2": 17.0}, halfmap_A=10.7, last_stage_A=10.0)
    assert not verdict["agree"] and verdict["disagreeing"] == ["1-2"]
    assert verdict["reference_A"] == 10.7
    assert verdict["threshold_A"] == pytest.approx(1.25 * 10.7)
    # At the half maps' resolution, or just within the slack, they agree.
    assert validation.seed_agreement({"1-2": 12.0}, 10.7, 10.0)["agree"]
    # Half maps finer than the last stage: the starts' maps cannot hold that detail.
    assert validation.seed_agreement({"1-2": 12.0}, 7.0, 10.0)["reference_A"] == 10.0
    assert not validation.seed_agreement({"1-2": np.inf}, 10.7, 10.0)["agree"]
    assert validation.seed_agreement({}, 10.7, 10.0)["agree"]  # one start: nothing to judge


def test_disagreeing_starts_are_a_warning_in_the_metrics(particles, tmp_path, monkeypatch):
    # The verdict's plumbing with the 17 A pair (the alignment itself is tested in
    # test_validation.py and by the genuine case above).
    truth = particles["truth"]
    args = write_run(tmp_path, particles, final_map=truth,
                     seed_maps={1: truth, 2: noisy(truth, 0.05, 1)})
    monkeypatch.setattr(validation, "pairwise_resolutions", lambda maps, pixel_size: {
        "1-2": 1.6 * 25.0})
    metrics, _ = validation.run_metrics(**args)
    assert metrics["status"] == "warning"
    assert not metrics["seed_consistency"]["agree"]
    assert any("random starts disagree" in w and "1.25" in w for w in metrics["warnings"])


def test_by_seed_splits_seed_major_lists():
    assert validation.by_seed(["a1", "a2", "b1", "b2"], ["1", "2"]) == {1: ["a1", "a2"],
                                                                        2: ["b1", "b2"]}
    with pytest.raises(ValueError):
        validation.by_seed(["a1", "a2", "b1"], [1, 2])


def test_choose_seed_takes_the_lowest_final_heldout_error(tmp_path):
    paths = {}
    for seed, last in ((1, 9.0), (2, 8.5), (3, None)):
        paths[seed] = tmp_path / f"{seed}.tsv"
        records.write_history(paths[seed], [{"iteration": 1, "heldout_nll": 10.0},
                                            {"iteration": 2, "heldout_nll": last}])
    best, scores = validation.choose_seed(paths)
    assert best == 2 and scores == {1: 9.0, 2: 8.5, 3: 10.0}


def test_a_map_that_is_not_the_references_structure_is_a_warning(particles, tmp_path):
    # Half maps from one refinement agree with each other whatever the structure: here they do
    # (the particles at their true poses). Against a reference of no structure at all the map
    # agrees nowhere, and the verdict must say so; against the truth it stays ok. (At this
    # test's 32 px and 5 A/px any two blobby molecules agree to ~20 A, so the thresholds
    # themselves are checked below on the figures of real runs.)
    truth = particles["truth"]
    unrelated = tmp_path / "unrelated.mrc"
    rng = np.random.default_rng(8)
    io.write_map(unrelated, np.abs(rng.standard_normal(truth.shape)).astype(np.float32), PIXEL)
    args = write_run(tmp_path / "wrong", particles, final_map=truth, seed_maps={1: truth})
    metrics, _ = validation.run_metrics(**args, reference=unrelated)
    assert metrics["status"] == "warning"
    assert any("disagrees with the reference" in w for w in metrics["warnings"]), \
        metrics["warnings"]
    right = tmp_path / "right.mrc"
    io.write_map(right, truth, PIXEL)
    args = write_run(tmp_path / "right", particles, final_map=truth, seed_maps={1: truth})
    metrics, _ = validation.run_metrics(**args, reference=right)
    assert metrics["status"] == "ok", metrics["warnings"]


def test_reference_disagreement_thresholds():
    # Figures of real runs: a 10,000-particle realistic set whose map was right (FSC 0.5 /
    # 0.143 against the truth 14.4 / 11.0 A, half maps 10.3 A), and a ribosome set in a box
    # it filled, whose map was wrong (124.9 / 24.6 A against half maps at 10.1 A).
    assert validation.reference_disagreement(14.4, 11.0, 10.3, 10.0) is None
    assert validation.reference_disagreement(124.9, 24.6, 10.1, 10.0) is not None
    assert validation.reference_disagreement(31.0, 15.0, 10.0, 10.0) is not None  # 0.5 only
    assert validation.reference_disagreement(25.0, 21.0, 10.0, 10.0) is not None  # 0.143 only
    # Coarse half maps widen the yardstick.
    assert validation.reference_disagreement(50.0, 30.0, 20.0, 10.0) is None
