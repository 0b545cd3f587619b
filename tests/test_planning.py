"""What the workflow plans before any job runs: each dataset's stages fitted to its Nyquist limit
(from a pixel size peeked out of the STAR file), a stage list that does not decrease refused, and
stage jobs whose params hold only what a stage reads, so that another seed or stage reruns
nothing finished."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from workflow_helpers import REPO, one_stage_config, run_snakemake, write_config

DEFAULT_STAGES = [40, 30, 20, 15, 12, 10]


def _load_planning():
    path = REPO / "workflow" / "rules" / "planning.py"
    spec = importlib.util.spec_from_file_location("cryoday_workflow_planning", path)
    planning = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = planning
    spec.loader.exec_module(planning)
    return planning


planning = _load_planning()


def planned(stdout: str) -> list[tuple[str, dict]]:
    """Each job of a dry run: its rule and wildcards."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", stdout)[1:]:
        rule = block.split(":", 1)[0].removeprefix("rule ")
        found = re.search(r"^\s+wildcards: (.*)$", block, re.MULTILINE)
        wildcards = dict(w.split("=", 1) for w in found.group(1).split(", ")) if found else {}
        jobs.append((rule, wildcards))
    return jobs


def _mock_params(workdir, rule: str, **wildcards) -> dict:
    """A rule's params as its script would get them (mock_snakemake), via a subprocess."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from _common import "
            f"mock_snakemake as m; s = m({rule!r}, **json.loads(sys.argv[2])); "
            "print(json.dumps(dict(s.params)))")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts"),
                           json.dumps(wildcards)], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


# ---------------------------------------------------------------------- the stage list


@pytest.mark.parametrize(("box", "pixel_size", "expected"), [
    (64, 5.0, DEFAULT_STAGES),  # Nyquist exactly 10 A: the last stage is at it, kept
    (64, 6.0, [40, 30, 20, 15, 12]),  # Nyquist 12 A: 10 A would repeat it, dropped
    (64, 3.0, DEFAULT_STAGES),  # the demo: nothing to change
    (64, 5.5, [40, 30, 20, 15, 12, 11]),  # 10 A clamped to Nyquist (11 A)
])
def test_stages_are_fitted_to_the_nyquist_limit(box, pixel_size, expected):
    plan = planning.fit_stages(DEFAULT_STAGES, planning.finest_resolution(box, pixel_size))
    assert plan.stages_A == pytest.approx(expected)
    assert plan.requested_A == DEFAULT_STAGES
    assert (plan.note == "") == (plan.stages_A == DEFAULT_STAGES)


def test_clamping_says_what_it_did():
    plan = planning.fit_stages([40, 20, 8, 6], 10.0)
    assert plan.stages_A == [40, 20, 10.0]
    assert "8 A clamped to it" in plan.note and "6 A dropped" in plan.note
    assert plan.note.endswith("the stages are 40, 20, 10 A")
    # Unknown sampling: the stages as given.
    assert planning.fit_stages([40, 20, 8], None).stages_A == [40, 20, 8]


def test_an_odd_box_is_limited_by_the_even_box_it_is_cropped_to():
    from cryoday.preprocess import stage_box

    finest = planning.finest_resolution(65, 1.0)
    assert finest > 2.0
    # Just coarser than the limit the crop accepts with the largest even box (64 px).
    assert stage_box(65, 1.0, finest * 1.05)[0] == 64


@pytest.mark.parametrize(("box", "pixel_size"), [(64, 5.0), (256, 0.885), (48, 4.88), (65, 1.0)])
def test_the_crop_and_the_slices_accept_a_stage_at_the_planned_limit(box, pixel_size):
    from cryoday.preprocess import stage_box
    from cryoday.projection import SliceOperator

    finest = planning.finest_resolution(box, pixel_size)
    new_box, new_pixel_size = stage_box(box, pixel_size, finest)
    SliceOperator(new_box, new_box * new_pixel_size / finest)


# ---------------------------------------------------------------------- the pixel-size peek

# Particle STAR files of every dialect in the shared data that cryoday reads (RELION 3.0 with
# detector pixel size and magnification, 3.1 to 5 with optics tables, blocks in either order,
# six optics groups, files written by pyem, Scipion and the starfile package).
DIALECTS = [
    "aspire/sample_particles_relion30.star", "aspire/sample_particles_relion31.star",
    "aspire/rln_proj_64_centered.star", "aspire/rln_proj_65_shifted.star",
    "cryodrgn/empiar_10076_7.star", "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star",
    "cryodrgn/relion31.star", "cryodrgn/relion31.v2.star", "cryodrgn/relion31.6opticsgroups.star",
    "cryodrgn/relion5.star", "cryodrgn/sta_testing_bin8.star", "relion/ref_it002_data.star",
    "simplecryoem/particles.star", "simplecryoem/pyem.star", "scipion-em-esrf/input_particles.star",
    "cryojax/test_starfile.star", "cryojax/trpv1_small_stack.star", "starfile/one_loop.star",
]


@pytest.mark.parametrize("name", DIALECTS)
def test_the_peek_finds_the_pixel_size_cryodays_reader_finds(shared_data, name):
    from cryoday import io

    path = shared_data / name
    peek = planning.peek_particles(path)
    if name == "cryodrgn/relion5.star":
        # cryoday refuses it (it names an image twice); its optics table gives 0.89 A/px.
        assert peek.pixel_size == pytest.approx(0.89, rel=1e-6), peek.source
        return
    try:
        particles = io.read_particles(path, require_ctf=False, check_stacks=True)
    except io.InputError:  # a stack that is not in the shared data
        particles = io.read_particles(path, require_ctf=False, check_stacks=False)
    assert peek.pixel_size == pytest.approx(particles.pixel_size, rel=1e-9), peek.source
    if particles.box is not None:
        assert peek.box == particles.box


def test_the_configs_pixel_size_counts_only_when_the_file_has_none(shared_data):
    from cryoday import io

    bare = shared_data / "aspire/rln_proj_64.star"  # no pixel size anywhere (ASPIRE used 5 A)
    assert planning.peek_particles(bare).pixel_size is None
    assert planning.peek_particles(bare, override=5.0) == planning.Peek(
        5.0, 64, "the config's pixel_size")
    with_optics = shared_data / "cryodrgn/relion31.star"
    assert planning.peek_particles(with_optics, override=9.0).pixel_size == pytest.approx(
        io.read_particles(with_optics, pixel_size=9.0, check_stacks=False).pixel_size)


def test_the_plan_through_snakemake_fits_each_dataset_and_says_so_once(tmp_path, shared_data):
    bare = str(shared_data / "aspire/rln_proj_64.star")
    write_config(tmp_path, {"datasets": {
        "at5": {"simulate": {"box": 64, "pixel_size": 5.0}},
        "at6": {"simulate": {"box": 64, "pixel_size": 6.0}},
        "star5": {"particles": bare, "pixel_size": 5.0},  # issue 14's 64 px at 5 A/px, real
        "unknown": {"particles": bare},  # preprocessing will refuse it; planned unchanged
    }})
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = {}
    croppers = {}
    for rule, wildcards in planned(proc.stdout):
        if rule == "reconstruct_stage":
            stages.setdefault(wildcards["dataset"], set()).add(int(wildcards["stage"]))
        if rule.startswith("stage_stacks"):
            croppers.setdefault(rule, set()).add(wildcards["dataset"])
    assert stages == {"at5": set(range(1, 7)), "at6": set(range(1, 6)),
                      "star5": set(range(1, 7)), "unknown": set(range(1, 7))}
    # One crop job per dataset, by stage count (a rule's outputs are fixed patterns).
    assert croppers == {"stage_stacks_5": {"at6"}, "stage_stacks_6": {"at5", "star5", "unknown"}}
    output = proc.stdout + proc.stderr
    said = [line for line in output.splitlines() if line.startswith("dataset ")]
    assert len(said) == 2, said
    assert said[0] == ("dataset at6, 64 px at 6 A/px in its simulate block: "
                       "reconstruction.stages_A 10 A finer than the data's Nyquist limit "
                       "(12 A): 10 A dropped (12 A is a stage already); the stages are "
                       "40, 30, 20, 15, 12 A")
    assert said[1].startswith(f"dataset unknown: the pixel size of {bare} cannot be read")
    # What validation gets, so the metrics list the stages each dataset ran.
    assert _mock_params(tmp_path, "validate", dataset="at6")["stages_A"] == [40, 30, 20, 15, 12]
    assert _mock_params(tmp_path, "stage_stacks_6", dataset="star5")["resolutions"] == [
        40, 30, 20, 15, 12, 10]


@pytest.mark.parametrize("stages", [[40, 40], [30, 40, 20]])
def test_stages_that_do_not_decrease_are_refused_in_one_line(tmp_path, stages):
    write_config(tmp_path, {"datasets": {"d": {"simulate": {}}},
                            "reconstruction": {"stages_A": stages}})
    proc = run_snakemake(tmp_path, "-n", "--cores", "1")
    assert proc.returncode != 0
    output = (proc.stdout + proc.stderr).strip()
    assert output.splitlines()[-1].startswith(
        "cryoday: reconstruction.stages_A must decrease strictly"), output
    assert "Traceback" not in output and "File " not in output


# ---------------------------------------------------------------------- stage params


def test_a_stage_gets_every_key_it_reads_and_no_other(tmp_path):
    from cryoday.stage_config import StageConfig, default_reconstruction_config

    factors = [2.0, 1.5, 1.25]
    write_config(tmp_path, {"datasets": {"d": {"simulate": {"box": 32}}},
                            "reconstruction": {"stages_A": [40, 30, 20, 15], "seeds": [1, 2],
                                               "undersampling": factors}})
    section = default_reconstruction_config(stages_A=[40, 30, 20, 15], seeds=[1, 2],
                                            undersampling=factors)
    script_keys = {"initial_model", "particle_diameter_A", "learning_rate_min"}
    stage_keys = {f.name for f in StageConfig.__dataclass_fields__.values()} | script_keys
    for stage in (1, 2, 4):
        params = _mock_params(tmp_path, "reconstruct_stage", dataset="d", seed="2",
                              stage=str(stage))
        options = params["options"]
        # symmetry and classes too: left out in C1 and for one class, so such a stage's params
        # are those from before they existed; refine_rounds is a param of its own, non-zero for
        # the last stage only (the others' params must not change when it does)
        assert set(options) == set(section) - {"seeds", "stages_A", "symmetry", "classes",
                                               "refine_rounds"}
        assert params["refine_rounds"] == (section["refine_rounds"] if stage == 4 else 0)
        assert set(options) <= stage_keys  # a new key no stage reads must be left out too
        assert options["undersampling"] == factors[:stage]
        assert StageConfig.from_config(options, stage, 2) == StageConfig.from_config(
            section, stage, 2)


def _stage_jobs(jobs):
    """(rule, seed, stage) of the planned jobs that make or reconstruct a stage, sorted."""
    return sorted((r, w.get("seed"), w["stage"]) for r, w in jobs if "stage" in w)


def _set(workdir, config, **reconstruction):
    config["reconstruction"].update(reconstruction)
    write_config(workdir, config)


@pytest.mark.slow
def test_another_seed_or_stage_plans_only_the_new_jobs(tmp_path):
    config = one_stage_config()
    write_config(tmp_path, config)
    proc = run_snakemake(tmp_path, "--cores", "2", "results/t/final/volume.mrc")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The kernels' warm-up marker lost: finished stages need nothing run again, and the
    # warm-up run again (it is ancient() to them) makes none of them rerun (below).
    (tmp_path / "results" / "kernels" / "warmup.json").unlink()
    proc = run_snakemake(tmp_path, "-n", "--cores", "2", "results/t/final/volume.mrc")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned(proc.stdout) == []
    proc = run_snakemake(tmp_path, "--cores", "2", "results/kernels/warmup.json")
    assert proc.returncode == 0, proc.stderr[-3000:]

    _set(tmp_path, config, seeds=[1, 2])
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _stage_jobs(planned(proc.stdout)) == [("reconstruct_stage", "2", "1")]
    assert sorted(r for r, _ in planned(proc.stdout)) == sorted(
        ["reconstruct_stage", "finalize", "final_map", "validate", "make_report", "all"])

    _set(tmp_path, config, seeds=[1], stages_A=[40, 30])
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The crops of every stage are one job (one read of the stack), which a new stage runs
    # again; its rewritten stage-1 stack then makes the first stage run again too.
    assert _stage_jobs(planned(proc.stdout)) == [("reconstruct_stage", "1", "1"),
                                                 ("reconstruct_stage", "1", "2")]
    assert {r for r, _ in planned(proc.stdout)} == {
        "stage_stacks", "reconstruct_stage", "finalize", "final_map", "validate", "make_report",
        "all"}
