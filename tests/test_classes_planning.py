"""Planning of a run of K classes: a dataset of one class plans no class job (its runs plan
what they planned before classes existed), one of K plans a ``class_outputs`` job per class,
and only a run of classes gives validate, final_map and make_report the class records."""

from __future__ import annotations

from test_planning import planned
from workflow_helpers import run_snakemake, write_config


def test_class_jobs_are_planned_for_k_classes_only(tmp_path):
    config = {
        "datasets": {"one": {"simulate": {"box": 24, "n_particles": 50}},
                     "three": {"simulate": {"box": 24, "n_particles": 50}, "classes": 3}},
        "reconstruction": {"stages_A": [40, 30], "seeds": [1, 2]},
    }
    write_config(tmp_path, config)
    proc = run_snakemake(tmp_path, "-n", "--cores", "2", "-p")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned(proc.stdout)
    by_rule = {}
    for rule, wildcards in jobs:
        by_rule.setdefault(rule, []).append(wildcards)
    assert sorted(w["k"] for w in by_rule["class_outputs"]) == ["1", "2", "3"]
    assert {w["dataset"] for w in by_rule["class_outputs"] + by_rule["class_summary"]} == {
        "three"}
    assert len(by_rule["class_summary"]) == 1
    # The class records are inputs of the K-class dataset's rules only.
    blocks = proc.stdout.split("\nrule ")
    for rule in ("validate", "make_report", "final_map"):
        for block in (b for b in blocks if b.startswith(f"{rule}:")):
            one = "dataset=one" in block
            assert ("classes.npz" in block) != one, (rule, block)


def test_one_class_plans_no_class_job(tmp_path):
    write_config(tmp_path, {"datasets": {"one": {"simulate": {"box": 24}}},
                            "reconstruction": {"stages_A": [40], "seeds": [1]}})
    proc = run_snakemake(tmp_path, "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rules = {rule for rule, _ in planned(proc.stdout)}
    assert rules == {"simulate", "preprocess", "compile_kernels", "stage_stacks",
                     "reconstruct_stage", "finalize", "final_map", "validate", "make_report",
                     "all"}
