"""The importance-sampling benchmark's code paths run (figures are not asserted: no targets)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cryoday.records import HISTORY_COLUMNS
from cryoday.records import history_from_array as _history_from_array
from cryoday.records import history_to_array as _history_array

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "importance.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("importance_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_history(path: Path, n_iter: int, batch: int, n_train: int, grid: int, fraction,
                  kl, kl_epoch=None, columns=HISTORY_COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for i in range(1, n_iter + 1):
            writer.writerow({"iteration": i, "epoch": i * batch / n_train, "objective": 1.0,
                             "heldout_nll": "", "eps": 1.0, "L": 1.0, "step": 0.1,
                             "wall_s": float(i), "n_evaluated": int(fraction(i) * batch * grid),
                             "n_full": batch * grid, "kl": "" if kl is None else kl(i),
                             "kl_epoch": "" if kl_epoch is None else kl_epoch(i)})


def test_run_figures_read_histories_and_plot(bench, tmp_path):
    # 4 iterations per epoch, 12 iterations: the last epoch is iterations 9-12.
    # Stage 1 as written before the kl_epoch column existed.
    write_history(tmp_path / "abinitio/seed1/stage1/history.tsv", 12, 50, 200, 1000,
                  lambda i: 1.0, None, columns=[c for c in HISTORY_COLUMNS if c != "kl_epoch"])
    write_history(tmp_path / "abinitio/seed1/stage2/history.tsv", 12, 50, 200, 10**6,
                  lambda i: 0.01 if i > 8 else 0.5, lambda i: 1.0 / i,
                  lambda i: 2.0 / i if i > 4 else None)
    out = bench.run_figures(tmp_path, tmp_path / "plot.png")
    stages = out["seeds"]["seed1"]
    assert [s["stage"] for s in stages] == [1, 2]
    assert stages[0]["speedup"] == pytest.approx(1.0)
    assert stages[1]["last_epoch_fraction"] == pytest.approx(0.01)
    assert stages[1]["speedup"] == pytest.approx(100.0)
    assert np.isnan(stages[0]["kl_per_epoch"]).all()
    assert np.isnan(stages[0]["kl_epoch_per_epoch"]).all()
    assert stages[1]["kl_per_epoch"][-1] == pytest.approx(np.mean([1 / i for i in range(9, 13)]))
    # Figure 3: the first epoch has no previous visit; then the means of the later epochs.
    assert np.isnan(stages[1]["kl_epoch_per_epoch"][0])
    assert stages[1]["kl_epoch_per_epoch"][1:] == pytest.approx(
        [np.mean([2 / i for i in range(5, 9)]), np.mean([2 / i for i in range(9, 13)])])
    assert (tmp_path / "plot.png").stat().st_size > 0
    json.dumps(bench.finite(out), allow_nan=False)


def test_figure6_small(bench):
    args = argparse.Namespace(box=64, pixel_size=3.0, snr=0.05, seed=0, images=3,
                              resolution=25.0, undersampling=1.5, s0=[3.0, 10.0], repeats=1,
                              no_uncapped=False)
    out = bench.figure6(args)
    assert out["true_pose_scale"] == pytest.approx(1.0, abs=0.1)
    for rows in (out["s0"], out["s0_uncapped"]):
        assert [r["s0"] for r in rows] == [3.0, 10.0]
        assert all(0 < r["mean_grid_fraction"] <= 1 for r in rows)
        assert all(np.isfinite(r["median_rel_error"]) for r in rows)


def test_checkpoint_history_without_the_kl_epoch_column_loads():
    """A checkpoint written before ``kl_epoch`` was appended to the history columns resumes:
    its rows lack the column, which is written back as missing."""
    old_columns = [c for c in HISTORY_COLUMNS if c != "kl_epoch"]
    old = np.arange(2 * len(old_columns), dtype=np.float64).reshape(2, -1)
    history = _history_from_array(old)
    assert [set(h) for h in history] == [set(old_columns)] * 2
    history.append({"iteration": 3.0, "kl_epoch": 0.5})
    array = _history_array(history)
    assert array.shape == (3, len(HISTORY_COLUMNS))
    assert np.isnan(array[:2, HISTORY_COLUMNS.index("kl_epoch")]).all()
    assert array[2, HISTORY_COLUMNS.index("kl_epoch")] == 0.5
    assert np.array_equal(array[:2, :len(old_columns)], old)
