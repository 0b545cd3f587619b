"""The workflow as a whole: lint, format, planning, and config validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from workflow_helpers import REPO, run_snakemake, write_config

RULES = {"simulate", "preprocess", "compile_kernels", "stage_stacks", "reconstruct_stage",
         "finalize", "final_map", "validate", "make_report", "all"}


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
    assert jobs["reconstruct_stage"] == n_stages * n_seeds and jobs["stage_stacks"] == 1
    assert jobs["compile_kernels"] == 1  # once, whatever the datasets and seeds


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
    assert jobs["stage_stacks"] == 2  # one pass per dataset, all its stages


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
    # Stage 2: 100 stored float32 gradients of 76^3 voxels (176 MB; 46,000 images, trained on
    # max_particles 20,000 of them) and 2 GiB of images at most, besides the likelihood's
    # working set; stage 1 is far smaller.
    assert resources[2][0] > resources[1][0] + 2000
    assert resources[2][0] >= 1000 + 176 + 1062
    assert resources[2][1] > resources[1][1]


def _run_script(workdir, script, *args):
    """A rule script run by hand (outside Snakemake), from ``workdir``."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=workdir,
                          capture_output=True, text=True, timeout=600)


def test_a_rule_script_runs_by_hand_through_mock_snakemake(tmp_path):
    write_config(tmp_path, {"datasets": {"d": {"simulate": {"box": 16, "n_particles": 4}}}})
    proc = _run_script(tmp_path, "simulate.py", "dataset=d")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from cryoday import io

    particles = io.read_particles(tmp_path / "results/d/simulated/particles.star")
    assert len(particles.table) == 4 and particles.box == 16
    assert particles.pixel_size == 3.0  # the schema's default inside the simulate block
    assert (tmp_path / "results/d/simulated/truth.mrc").exists()
    assert "simulated 4 / 4 particles" in (tmp_path / "logs/simulate/d.log").read_text()


def test_mock_snakemake_gives_the_rules_params_with_nested_defaults_and_a_configfile(tmp_path):
    write_config(tmp_path, {"datasets": {"d": {"simulate": {"box": 16}}},
                            "reconstruction": {"stages_A": [30, 20], "seeds": [5]}})
    (tmp_path / "more.yaml").write_text("reconstruction:\n  minibatch_size: 7\n")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from _common import "
            "mock_snakemake as m; s = m('reconstruct_stage', configfile='more.yaml', "
            "dataset='d', seed='5', stage='2'); t = m('simulate', dataset='d'); "
            "print(json.dumps([dict(t.params.simulate), s.params.options, list(s.input), "
            "s.threads]))")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    simulate, options, inputs, threads = json.loads(proc.stdout.splitlines()[-1])
    assert simulate["box"] == 16 and simulate["snr"] == 0.05
    assert options["minibatch_size"] == 7 and options["importance_max_shifts"] == 64
    assert "results/d/abinitio/seed5/stage1/state.npz" in inputs
    assert threads >= 1


def _star_naming_a_missing_stack(directory):
    star = directory / "p.star"
    star.write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n_rlnImageSize #3\n"
        "_rlnVoltage #4\n_rlnSphericalAberration #5\n_rlnAmplitudeContrast #6\n"
        "1 2.0 32 300 2.7 0.1\n\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n"
        "_rlnDefocusV #3\n_rlnDefocusAngle #4\n_rlnOpticsGroup #5\n"
        "000001@missing.mrcs 10000 10000 0 1\n000002@missing.mrcs 10000 10000 0 1\n")
    write_config(directory, {"datasets": {"x": {"particles": str(star)}}})
    return f"cryoday: {directory / 'missing.mrcs'}: particle stack not found"


def test_bad_input_in_a_rule_prints_one_line_and_logs_the_traceback(tmp_path):
    message = _star_naming_a_missing_stack(tmp_path)
    proc = _run_script(tmp_path, "preprocess.py", "dataset=x")
    assert proc.returncode != 0
    assert proc.stderr.splitlines()[-1] == message
    assert "Traceback" not in proc.stderr
    assert "Traceback" in (tmp_path / "logs/preprocess/x.log").read_text()
    # Through Snakemake: the message once, no traceback among the job's output.
    proc = run_snakemake(tmp_path, "--cores", "1", "results/x/preprocess/particles.star")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("particle stack not found") == 1 and message in output
    assert "Traceback" not in output
