"""The workflow as a whole: lint, format, planning, and config validation."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from workflow_helpers import REPO, run_snakemake, write_config

RULES = {"simulate", "preprocess", "downsample", "reconstruct_stage", "finalize", "validate",
         "make_report", "all"}


def planned_jobs(stdout: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    lines = stdout.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_lint_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--workflow-profile",
                           "none"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations" in proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("snakefmt") is None, reason="snakefmt is not installed")
def test_snakefmt_is_clean():
    proc = subprocess.run(["snakefmt", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_config_plans_the_whole_pipeline(tmp_path):
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr
    jobs = planned_jobs(proc.stdout)
    assert set(jobs) == RULES
    n_stages, n_seeds = 6, 2
    assert jobs["reconstruct_stage"] == n_stages * n_seeds and jobs["downsample"] == n_stages


def test_several_datasets_and_seeds_side_by_side(tmp_path, shared_data):
    config = {
        "datasets": {
            "sim": {"simulate": {"box": 32, "n_particles": 50}},
            "trpv1": {"particles": str(shared_data / "cryojax" / "trpv1_small_stack.star")},
        },
        "reconstruction": {"stages_A": [30, 20], "seeds": [1, 2]},
    }
    write_config(tmp_path, config)
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr
    jobs = planned_jobs(proc.stdout)
    assert jobs["simulate"] == 1
    assert jobs["preprocess"] == 2
    assert jobs["reconstruct_stage"] == 2 * 2 * 2  # datasets x seeds x stages
    assert jobs["downsample"] == 2 * 2


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"datasets": {"d": {"simulate": {}}}, "reconstruction": {"stage": [40]}}, "stage"),
        ({"datasets": {"d": {"simulate": {"box": "big"}}}}, "big"),
        ({"datasets": {"d": {"particles": "p.star", "simulate": {}}}}, "oneOf"),
        ({"datasets": {}}, "datasets"),
        ({"datasets": {"d": {"simulate": {"snr": -1}}}}, "snr"),
        ({"datasets": {"bad name!": {"simulate": {}}}}, "bad name!"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(tmp_path, config, expected):
    write_config(tmp_path, config)
    proc = run_snakemake(tmp_path, "-n", "--cores", "1")
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr


def test_slurm_profile_plans_with_its_resources(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm",
                        reason="pip install snakemake-executor-plugin-slurm (in the test extra)")
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--workflow-profile", str(REPO / "profiles" / "slurm"), "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = proc.stdout.split("rule ")
    stage_jobs = [j for j in jobs if j.startswith("reconstruct_stage:")]
    assert stage_jobs
    assert all("mem_mb=4000" in j and "runtime=240" in j for j in stage_jobs)
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["set-threads"]["reconstruct_stage"] > 2
    assert all("slurm_partition=CHANGE_ME" in j for j in jobs if j.startswith("preprocess:"))


def test_stage_memory_and_time_scale_with_the_stage_data(tmp_path):
    # Snakemake evaluates a stage's resources again once its images exist; here they exist
    # already (sparse files), as they would when a 46,000-particle stage is about to be submitted.
    config = {"datasets": {"d": {"simulate": {"box": 128, "pixel_size": 2.8}}},
              "reconstruction": {"stages_A": [40, 10], "seeds": [1]}}
    write_config(tmp_path, config)
    pre = tmp_path / "results/d/preprocess"
    pre.mkdir(parents=True)
    n_images = 46_000
    for stage, box in ((1, 20), (2, 76)):
        (pre / f"stage{stage}.json").write_text(f'{{"box": {box}}}')
        with open(pre / f"stage{stage}.mrcs", "wb") as f:
            f.truncate(1024 + n_images * box * box * 4)
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resources = {}
    for job in proc.stdout.split("rule ")[1:]:
        if job.startswith("reconstruct_stage:"):
            stage = int(job.split("stage=")[1].split(",")[0].split()[0])
            mem = int(job.split("mem_mb=")[1].split(",")[0])
            runtime = int(job.split("runtime=")[1].split(",")[0].split()[0])
            resources[stage] = (mem, runtime)
    assert set(resources) == {1, 2}, proc.stdout[-3000:]
    # Stage 2: 230 stored float32 gradients of 76^3 voxels (404 MB) and 2 GiB of images at most,
    # besides the likelihood's working set; stage 1 is far smaller.
    assert resources[2][0] > resources[1][0] + 2000
    assert resources[2][0] >= 1000 + 404 + 1062
    assert resources[2][1] > resources[1][1]
