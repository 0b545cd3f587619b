"""The final map's sharded path (``shards`` > 1) through Snakemake: one ``final_map_shard`` job
per shard, added up by ``final_map``, give the map of one job."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
from test_planning import planned
from workflow_helpers import one_stage_config, run_snakemake, write_config


@pytest.mark.slow
def test_two_shards_give_the_one_job_map(tmp_path):
    config = one_stage_config()
    write_config(tmp_path, config)
    target = "results/t/final/map_full.mrc"
    proc = run_snakemake(tmp_path, "--cores", "2", target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "results" / "t" / "final"
    one = {name: mrcfile.read(final / name) for name in ("map_full.mrc", "half1.mrc")}
    figures = json.loads((final / "final_map.json").read_text())

    write_config(tmp_path, {**config, "shards": 2})
    proc = run_snakemake(tmp_path, "-n", "--cores", "2", target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only the final map is redone: two shard jobs and the job adding them up.
    jobs = planned(proc.stdout)
    assert sorted(r for r, _ in jobs) == ["final_map", "final_map_shard", "final_map_shard"]
    assert sorted(w["shard"] for r, w in jobs if r == "final_map_shard") == ["1", "2"]
    proc = run_snakemake(tmp_path, "--cores", "2", target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, expected in one.items():
        got = mrcfile.read(final / name)
        np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    sharded = json.loads((final / "final_map.json").read_text())
    assert sharded["n_insertions"] == figures["n_insertions"]
    assert sharded["halfmap_fsc0143_masked_A"] == pytest.approx(
        figures["halfmap_fsc0143_masked_A"], rel=1e-6)
    assert not list((final / "shards").glob("*.npz"))  # temporary: deleted once added up
    log = (tmp_path / "logs" / "final_map" / "t.log").read_text()
    assert "the insertion sums of 2 shards added up" in log
