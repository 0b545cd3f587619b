"""Checkpoints: a stage killed at a random iteration and rerun ends exactly as if it had never been
killed; a checkpoint that no longer fits the stage (other settings, unreadable, or one a resumed
stage failed from) is discarded with one log line, and the stage equals a fresh one.

Run as a script (``python tests/test_checkpoints.py DATA CHECKPOINT KILL_AT``) it runs the test
stage and SIGKILLs itself after iteration ``KILL_AT``, as a cluster's time limit would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cryoday import initial, molecule, records, simulate
from cryoday.sagd import SAGD
from cryoday.checkpoint import _length_change
from cryoday.stage import run_stage, train
from cryoday.stage_config import StageConfig, default_reconstruction_config
from stage_helpers import ScriptedObjective

REPO = Path(__file__).resolve().parents[1]
BOX, PIXEL_SIZE, RESOLUTION, N_IMAGES, N_HELDOUT = 32, 5.0, 40.0, 240, 40
# Importance sampling on (capped below the 1,728-point grid), so the draws, the stored
# posteriors and the dataset average all have to be restored for the map to replay.
SETTINGS = {"minibatch_size": 40, "max_iterations": 24, "min_iterations": 8, "patience": 2,
            "heldout_every": 2, "checkpoint_every": 3, "importance_min_grid_points": 0,
            "s0": 2.0, "importance_coverage": 0.5, "importance_max_rotations": 300}
SHORT = {"max_iterations": 3, "checkpoint_every": 2}


def make_data(path: Path) -> None:
    volume = molecule.synthetic_molecule(BOX, PIXEL_SIZE)
    images, table = next(simulate.simulate_chunks(volume, PIXEL_SIZE, N_IMAGES, snr=0.5, seed=3))
    images = ((images - images.mean()) / images[:, :3].std()).astype(np.float32)
    np.savez(path, images=images, defocus_u=table.rlnDefocusU.to_numpy(),
             defocus_v=table.rlnDefocusV.to_numpy(),
             defocus_angle=table.rlnDefocusAngle.to_numpy())


def stage(data_path, checkpoint=None, log=None, after_iteration=None, **overrides):
    with np.load(data_path) as f:
        images = f["images"]
        ctf = {k: f[k] for k in ("defocus_u", "defocus_v", "defocus_angle")}
    ctf.update(voltage=300.0, cs=2.7, amplitude_contrast=0.1)
    config = StageConfig.from_config(
        default_reconstruction_config(**{**SETTINGS, **overrides}), 1, 1)
    rows = np.arange(N_IMAGES)
    return run_stage(initial.random_blobs(BOX, PIXEL_SIZE, seed=1), images, ctf, 1.0,
                     PIXEL_SIZE, RESOLUTION, rows[N_HELDOUT:], rows[:N_HELDOUT], config,
                     log=log or (lambda line: None), checkpoint_path=checkpoint,
                     scale_start=True, after_iteration=after_iteration)


def history_text(result, tmp_dir) -> str:
    """The stage's history.tsv as written, without the wall-clock column."""
    path = Path(tmp_dir) / "history.tsv"
    result.save_history(path)
    drop = records.HISTORY_COLUMNS.index("wall_s")
    return "\n".join("\t".join(cells[:drop] + cells[drop + 1:])
                     for cells in (line.split("\t") for line in path.read_text().splitlines()))


def assert_same_stage(result, expected):
    """Bitwise the same map, poses, likelihoods and history (but its wall-clock times)."""
    assert np.array_equal(result.volume, expected.volume)
    for name in ("rotations", "shifts_px", "nll", "null_nll"):
        # null_nll is NaN but for the held-out images.
        assert np.array_equal(getattr(result, name), getattr(expected, name),
                              equal_nan=True), name
    with tempfile.TemporaryDirectory() as tmp:
        assert history_text(result, tmp) == history_text(expected, tmp)
    assert result.optimiser.t == expected.optimiser.t


class Stop(BaseException):
    """Ends a stage in the test's process as a kill would, without the failure handling."""


def stop_after(k):
    def hook(iteration):
        if iteration == k:
            raise Stop
    return hook


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoints") / "data.npz"
    make_data(path)
    return path


@pytest.fixture(scope="module")
def never_killed(data):
    return stage(data)


@pytest.fixture(scope="module")
def short_fresh(data):
    return stage(data, **SHORT)


@pytest.fixture(scope="module")
def short_checkpoint(data, tmp_path_factory):
    """The bytes of a checkpoint of the short stage at iteration 2."""
    path = tmp_path_factory.mktemp("short") / "checkpoint.npz"
    with pytest.raises(Stop):
        stage(data, path, after_iteration=stop_after(3), **SHORT)
    return path.read_bytes()


def killed_at(data, checkpoint, k):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__, str(data), str(checkpoint), str(k)],
                          check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc.stdout


def test_a_stage_killed_twice_at_random_iterations_ends_as_if_never_killed(data, never_killed,
                                                                           tmp_path):
    stopped = len(never_killed.history)
    every = SETTINGS["checkpoint_every"]
    # Early stopping must be at stake: its count has to survive the kills.
    assert stopped < SETTINGS["max_iterations"], "the test stage no longer stops early"
    rng = np.random.default_rng(14)
    first = int(rng.integers(every, stopped // 2 + 1))
    second = int(rng.integers(first + 1, stopped))
    checkpoint = tmp_path / "checkpoint.npz"
    out = killed_at(data, checkpoint, first)
    assert f"iteration {first} done" in out and f"iteration {first + 1} done" not in out
    out = killed_at(data, checkpoint, second)
    assert f"resuming from checkpoint {checkpoint} at iteration {first // every * every}" in out
    lines = []
    resumed = stage(data, checkpoint, log=lines.append)
    assert f"resuming from checkpoint {checkpoint} at iteration {second // every * every}" in lines
    assert_same_stage(resumed, never_killed)


def test_a_checkpoint_written_with_another_minibatch_size_is_discarded(data, short_fresh,
                                                                       tmp_path):
    checkpoint = tmp_path / "checkpoint.npz"
    with pytest.raises(Stop):
        stage(data, checkpoint, after_iteration=stop_after(3), minibatch_size=60, **SHORT)
    assert checkpoint.exists()
    lines = []
    result = stage(data, checkpoint, log=lines.append, **SHORT)
    assert (f"checkpoint {checkpoint} was written with minibatch_size 60, now 40: starting the "
            "stage afresh") in lines
    assert not any("resuming" in line for line in lines)
    assert_same_stage(result, short_fresh)


def _truncated(raw: bytes) -> bytes:
    return raw[:len(raw) // 2]


def _garbage(raw: bytes) -> bytes:
    return b"not a checkpoint"


def _without(key):
    def edit(arrays):
        del arrays[key]
    return edit


def _stored_of_another_shape(arrays):
    arrays["stored"] = arrays["stored"][:, :-1]


@pytest.mark.parametrize(("of_bytes", "damage", "said"), [
    (True, _truncated, "could not be read"),
    (True, _garbage, "could not be read"),
    (False, _without("stored"), "could not be read (KeyError"),
    (False, _stored_of_another_shape, "could not be read (ValueError"),
    (False, _without("is_has"), "could not be read (KeyError"),
    (False, _without("fingerprint"), "has no fingerprint"),
], ids=["truncated", "garbage", "missing-gradients", "wrong-shape", "missing-posteriors",
        "no-fingerprint"])
def test_a_damaged_checkpoint_is_discarded(data, short_fresh, short_checkpoint, tmp_path,
                                           of_bytes, damage, said):
    checkpoint = tmp_path / "checkpoint.npz"
    checkpoint.write_bytes(short_checkpoint)
    if of_bytes:
        checkpoint.write_bytes(damage(short_checkpoint))
    else:
        arrays = records.read_npz(checkpoint)
        damage(arrays)
        records.write_npz(checkpoint, **arrays)
    lines = []
    result = stage(data, checkpoint, log=lines.append, **SHORT)
    discarded = [line for line in lines if line.startswith(f"checkpoint {checkpoint} ")]
    assert len(discarded) == 1 and said in discarded[0], lines[:3]
    assert discarded[0].endswith(": starting the stage afresh")
    assert_same_stage(result, short_fresh)


def test_an_intact_checkpoint_resumes_the_short_stage(data, short_fresh, short_checkpoint,
                                                      tmp_path):
    checkpoint = tmp_path / "checkpoint.npz"
    checkpoint.write_bytes(short_checkpoint)
    lines = []
    result = stage(data, checkpoint, log=lines.append, **SHORT)
    assert f"resuming from checkpoint {checkpoint} at iteration 2" in lines
    assert_same_stage(result, short_fresh)


def test_a_stage_failing_after_its_resume_sets_the_checkpoint_aside(data, short_fresh,
                                                                    short_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint.npz"
    checkpoint.write_bytes(short_checkpoint)
    lines = []

    def fail(iteration):
        raise IndexError("as a stale checkpoint once made every rerun fail")

    with pytest.raises(IndexError):
        stage(data, checkpoint, log=lines.append, after_iteration=fail, **SHORT)
    assert not checkpoint.exists()
    assert (tmp_path / "checkpoint.npz.failed").read_bytes() == short_checkpoint
    assert any("set aside" in line and "IndexError" in line for line in lines)
    lines.clear()
    result = stage(data, checkpoint, log=lines.append, **SHORT)
    assert not any("resuming" in line for line in lines)
    assert_same_stage(result, short_fresh)


def test_early_stopping_continues_its_count_from_the_history():
    # 4.0 is the best; 3.9999 is not better by the required fraction, so neither is a new best
    # although it is the lowest value (the old resume took the minimum and restarted the count).
    script = [5.0, 4.0, 3.9999, 4.5, 4.6, 4.7]
    config = StageConfig.from_config(default_reconstruction_config(
        minibatch_size=5, max_iterations=10, min_iterations=0, patience=3, heldout_every=1),
        1, 1)
    volume = np.ones((4, 4, 4), np.float32)
    whole = []
    train(volume, SAGD(2, volume.shape, seed=1), ScriptedObjective(script), None, config,
          whole, log=lambda *_: None)
    assert len(whole) == 5  # three evaluations without a new best after 4.0
    history = whole[:3]
    train(volume, SAGD(2, volume.shape, seed=1), ScriptedObjective(script[3:]), None, config,
          history, log=lambda *_: None)
    assert len(history) == 5


def test_only_a_length_change_that_keeps_the_iterations_keeps_a_checkpoint():
    def config(**kw):
        return StageConfig.from_config(default_reconstruction_config(
            **{"heldout_every": 2, "max_iterations": 10, "min_iterations": 0,
               "patience": 2, **kw}), 1, 1)

    old = {"max_iterations": 10, "min_iterations": 0, "patience": 2}
    history = [{"iteration": i, "heldout_nll": v}
               for i, v in enumerate([np.nan, 5.0, np.nan, 5.5, np.nan, 5.6], 1)]
    assert _length_change(old, history, config()) is None
    assert _length_change(old, history, config(max_iterations=40)) is None
    assert "its 6 iterations" in _length_change(old, history, config(max_iterations=5))
    # The old run ended at 5, off the held-out schedule, so it evaluated there and a longer
    # run would not have.
    assert "its 5 iterations" in _length_change({**old, "max_iterations": 5}, history[:5],
                                                config())
    assert "would have stopped at iteration 4" in _length_change(old, history,
                                                                  config(patience=1))


if __name__ == "__main__":
    data_path, checkpoint_path, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def log(line):
        print(line, flush=True)

    def kill(iteration):
        log(f"iteration {iteration} done")
        if iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    stage(data_path, checkpoint_path, log=log, after_iteration=kill)
