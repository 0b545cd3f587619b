"""``reconstruction.max_particles``: a stage's SAGD loop trains on at most that many training
particles (the same random subset in every stage of a start), its final pose pass covers all,
its checkpoint knows the cap, and the workflow's memory request shrinks with it."""

from __future__ import annotations

import numpy as np
import pytest
from stage_helpers import tiny_particle_set
from workflow_helpers import run_snakemake, write_config

from cryoday import initial, molecule, stage
from cryoday.checkpoint import stage_fingerprint
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config, training_subset

N, HELD_OUT, BOX, PSIZE = 100, 20, 24, 8.0


@pytest.fixture(scope="module")
def tiny_set():
    return tiny_particle_set(molecule.synthetic_molecule(BOX, PSIZE), PSIZE, N, seed=2)


def _config(stage_number=1, seed=1, **overrides):
    settings = {"minibatch_size": 20, "max_iterations": 4, "min_iterations": 4,
                "heldout_every": 2, "checkpoint_every": 2, **overrides}
    section = default_reconstruction_config(**settings)
    return StageConfig.from_config(section, stage_number, seed)


def _run(tiny_set, config, **kwargs):
    images, ctf = tiny_set
    rows = np.arange(N)
    start = initial.random_blobs(BOX, PSIZE, seed=1)
    return run_stage(start, images, ctf, 1.0, PSIZE, 30.0, rows[HELD_OUT:], rows[:HELD_OUT],
                     config, scale_start=True, **{"log": lambda *_: None, **kwargs})


def test_the_subset_is_the_starts_not_the_stages():
    rows = np.arange(50, 10_050)
    config = _config()
    assert config.max_particles == 20_000  # the schema's default
    assert [_config(s, 7).start_seed for s in (1, 2, 6)] == [7, 7, 7]
    assert _config(1, 0).start_seed == 0
    first = training_subset(rows, 1000, _config(1, 3).start_seed)
    assert len(first) == 1000 == len(np.unique(first))
    assert np.isin(first, rows).all() and np.all(np.diff(first) > 0)
    # Every stage of a start trains on the same particles; another start draws others.
    assert np.array_equal(first, training_subset(rows, 1000, _config(4, 3).start_seed))
    assert not np.array_equal(first, training_subset(rows, 1000, _config(1, 4).start_seed))
    # At or below the cap, and without one, the rows are the training rows, in their order.
    shuffled = np.random.default_rng(0).permutation(rows)
    for cap in (len(rows), len(rows) + 1, None):
        assert training_subset(shuffled, cap, 3) is not None
        assert np.array_equal(training_subset(shuffled, cap, 3), shuffled)


def test_a_cap_at_or_above_the_training_set_changes_nothing(tiny_set):
    uncapped = _run(tiny_set, _config(max_particles=None))
    for cap in (N - HELD_OUT, 20_000):
        capped = _run(tiny_set, _config(max_particles=cap))
        assert np.array_equal(capped.volume, uncapped.volume)
        assert np.array_equal(capped.rotations, uncapped.rotations)
        assert np.array_equal(capped.nll, uncapped.nll)
        assert [h["objective"] for h in capped.history] == \
            [h["objective"] for h in uncapped.history]


def test_a_capped_stage_trains_on_the_subset_and_poses_every_particle(tiny_set, monkeypatch):
    partitions = []
    objective = stage._Objective

    def spy(*args, **kwargs):
        made = objective(*args, **kwargs)
        partitions.append(made.partition)
        return made

    monkeypatch.setattr(stage, "_Objective", spy)
    cap = 30
    config = _config(max_particles=cap)
    result = _run(tiny_set, config)
    (partition,) = partitions
    fitted = np.concatenate(partition)
    expected = training_subset(np.arange(HELD_OUT, N), cap, config.start_seed)
    assert len(partition) == 2 and sorted(fitted) == list(expected)
    assert result.optimiser.n_batches == 2  # 30 in minibatches of 20, not 80 in 4
    assert result.history[0]["epoch"] == pytest.approx(20 / cap)
    # The final pass covers every particle, trained on or not, held out included.
    assert result.rotations.shape == (N, 3, 3) and np.isfinite(result.nll).all()
    assert np.allclose(np.einsum("nij,nkj->nik", result.rotations, result.rotations),
                       np.eye(3), atol=1e-9)
    assert result.sampler.store.has.all()
    assert list(result.heldout_rows) == list(range(HELD_OUT))


def test_the_checkpoint_fingerprint_holds_the_cap(tiny_set, tmp_path):
    images, ctf = tiny_set
    rows = np.arange(N)

    def fingerprint(cap):
        return stage_fingerprint(_config(max_particles=cap), images, ctf, 1.0, PSIZE, 30.0,
                                 rows[HELD_OUT:], rows[:HELD_OUT], np.zeros((4, 4, 4)))

    assert fingerprint(30)["params"]["max_particles"] == 30
    assert fingerprint(None)["params"]["max_particles"] is None
    assert fingerprint(30) != fingerprint(40)
    # A stage killed with one cap does not resume with another: its partition differs.
    checkpoint = tmp_path / "checkpoint.npz"
    lines = []
    _run(tiny_set, _config(max_particles=30, max_iterations=2, min_iterations=2),
         checkpoint_path=checkpoint)
    assert checkpoint.exists()
    _run(tiny_set, _config(max_particles=40, max_iterations=2, min_iterations=2),
         checkpoint_path=checkpoint, log=lines.append)
    assert any("max_particles 30, now 40" in line and "afresh" in line for line in lines)


def _stage_memory(tmp_path, n_images, **reconstruction):
    """The memory (MB) Snakemake asks for the 76-px stage of ``n_images`` images."""
    config = {"datasets": {"d": {"simulate": {"box": 128, "pixel_size": 2.8}}},
              "reconstruction": {"stages_A": [40, 10], "seeds": [1], **reconstruction}}
    tmp_path.mkdir(parents=True)
    write_config(tmp_path, config)
    pre = tmp_path / "results/d/preprocess"
    pre.mkdir(parents=True, exist_ok=True)
    for number, box in ((1, 20), (2, 76)):
        (pre / f"stage{number}.json").write_text(f'{{"box": {box}}}')
        with open(pre / f"stage{number}.mrcs", "wb") as f:  # sparse: only the size counts
            f.truncate(1024 + n_images * box * box * 4)
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in proc.stdout.split("rule ")[1:]:
        if job.startswith("reconstruct_stage:") and "stage=2" in job:
            return int(job.split("mem_mb=")[1].split(",")[0])
    raise AssertionError(proc.stdout[-3000:])


def test_the_stage_memory_request_counts_the_capped_gradients(tmp_path):
    n = 100_000
    gradients_mb = 76**3 * 4 / 1e6  # one stored float32 volume per minibatch of 200
    everything = _stage_memory(tmp_path / "all", n, max_particles=None)
    default = _stage_memory(tmp_path / "default", n)
    small = _stage_memory(tmp_path / "small", n, max_particles=5000)
    # 500, 100 and 25 stored gradients; the rest of the request is the same.
    assert everything - default == pytest.approx((500 - 100) * gradients_mb, abs=2)
    assert default - small == pytest.approx((100 - 25) * gradients_mb, abs=2)
    # Above the cap (and the 2 GiB of kept images) the request still grows with the particles:
    # their records, 3 kB each (the importance store, the table row, the pose).
    more = _stage_memory(tmp_path / "more", 2 * n)
    assert more - default == pytest.approx(n * 3000 / 1e6, abs=2)
    # Below the cap the request is that of no cap.
    assert _stage_memory(tmp_path / "few", 5000, max_particles=None) == \
        _stage_memory(tmp_path / "few_capped", 5000)
