"""Scale benchmark: the passes over every particle of a large simulated set, and one stage.

Runs the real workflow (Snakemake, one job after another) on a simulated data set of
``--n`` particles of ``--box`` px, each step under ``/usr/bin/time -v``, and prints each step's
time, peak memory (max RSS of any process of the step) and throughput (images per second):
simulate, preprocess, the stage crops (rule ``stage_stacks``: one pass for every stage of
``--stages``), and, with ``--iterations`` above 0, the first reconstruction stage. Beside
them, for the before/after comparison of issue 18:

- ``crops_per_stage``: the stage crops as the per-stage ``downsample`` jobs made them (one
  process per stage, each a full read of the stack; ``preprocess.downsample_stream``);
- ``validate_poses`` (and ``validate_poses_before`` with ``--before-repo``, the same pass with
  another checkout's ``cryoday``): validation's per-particle pass, the pose errors of the
  simulated particles' true poses against jittered ones read from STAR files as
  ``validation.pose_error_figures`` does;
- ``validate_align`` (with ``--align``): the map alignment validation runs once per reference
  and once per pair of seeds (``align.fsc_after_alignment``, the truth against its rotated
  copy at the full box), which does not depend on the particle count.

Nothing is asserted: the figures go into the issue notes.

    python benchmarks/scale.py --n 10000 --box 128 --iterations 0 --before-repo /work/main

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from cryoday.records import read_history
from cryoday.stage_config import default_reconstruction_config

REPO = Path(__file__).resolve().parents[1]
TIME_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def timed_python(code: str, *args: str, repo: Path = REPO) -> dict:
    """Run ``python -c code args`` with ``repo`` first on the path, under /usr/bin/time."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", code, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"failed: python -c {code[:60]!r}...")
    peak_kb = int(TIME_RSS.search(proc.stderr).group(1))
    return {"job_s": wall, "peak_rss_mb": peak_kb / 1024, "stdout": proc.stdout.strip()}


# One old-style crop job: one stage, one full read of the normalised stack.
CROP_ONE_STAGE = """
import json, sys
from pathlib import Path
from cryoday import io, preprocess
stack_path, info_path, resolution, out, chunk = sys.argv[1:6]
info = json.loads(Path(info_path).read_text())
new_box, new_pixel_size = preprocess.stage_box(info["box"], info["pixel_size"], float(resolution))
stack = io.open_stack(stack_path)
with io.StackWriter(out, len(stack), new_box, new_pixel_size) as writer:
    preprocess.downsample_stream(lambda rows: io.read_rows(stack, rows), len(stack), writer.data,
                                 new_box, chunk_size=int(chunk))
"""

# Validation's per-particle pass: pose errors of STAR poses against the simulation's truth.
VALIDATE_POSES = """
import json, sys
from cryoday import validation
figures = validation.pose_error_figures(sys.argv[1], sys.argv[2], float(sys.argv[3]))
print(json.dumps({"median_deg": figures["pose_error_median_deg"]}))
"""

# The map alignment of validation (box^3 work, once per reference and per pair of seeds).
VALIDATE_ALIGN = """
import json, sys
import numpy as np
from scipy.spatial.transform import Rotation
from cryoday import io
from cryoday.align import _transform, fsc_after_alignment
truth, pixel_size = io.read_map(sys.argv[1])
turned = _transform(truth.astype(np.float64), Rotation.from_euler("zyz", [30, 50, 70],
                    degrees=True).as_matrix(), np.array([1.0, -2.0, 0.5]), order=3)
_, _, _, res = fsc_after_alignment(turned.astype(np.float32), truth, pixel_size)
print(json.dumps({"fsc0143_A": res}))
"""


def same_stack(a: Path, b: Path) -> bool:
    """Byte-equal MRC files but for the header's labels (mrcfile stamps the creation time)."""
    x, y = a.read_bytes(), b.read_bytes()
    return len(x) == len(y) and x[:220] == y[:220] and x[1024:] == y[1024:]


def jittered_star(truth_star: Path, out: Path, sigma_deg: float = 3.0) -> None:
    """The simulated particles with their Euler angles jittered: "estimated" poses to judge."""
    from cryoday import io

    particles = io.read_particles(truth_star, check_stacks=False)
    table = particles.table.copy()
    rng = np.random.default_rng(0)
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        table[column] = table[column] + rng.normal(0, sigma_deg, len(table))
    io.write_particles(out, particles.original_table(table), particles.optics)


def timed_snakemake(workdir: Path, target: str, cores: int) -> dict:
    cmd = [
        "/usr/bin/time", "-v", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
        "--directory", str(workdir), "--workflow-profile", "none", "--cores", str(cores), target,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"snakemake failed on {target}")
    peak_kb = int(TIME_RSS.search(proc.stderr).group(1))
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024}


def rule_benchmark(path: Path) -> dict:
    with open(path) as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    return {"job_s": float(row["s"]), "job_max_rss_mb": float(row["max_rss"])}


def report(name: str, step: dict, n_images: int | None) -> None:
    if n_images:
        step["images_per_s"] = n_images / step["job_s"]
    rate = f"{step['images_per_s']:10.0f} images/s" if n_images else ""
    print(f"{name:22s} job {step['job_s']:8.1f} s  peak RSS {step['peak_rss_mb']:8.0f} MB  {rate}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="particles")
    parser.add_argument("--box", type=int, default=128, help="box in px")
    parser.add_argument("--pixel-size", type=float, default=2.8, help="A/px")
    parser.add_argument("--stages", default="40,30,20,15,12,10",
                        help="stage resolutions (A), comma-separated")
    parser.add_argument("--iterations", type=int, default=20,
                        help="iterations of the first stage (0: no reconstruction)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=1000, help="images per read")
    parser.add_argument("--before-repo", type=Path, default=None,
                        help="a checkout whose cryoday gives the 'before' validate pass")
    parser.add_argument("--align", action="store_true",
                        help="also time validation's map alignment at the full box")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cryoday-scale"))
    args = parser.parse_args()

    stages_A = [float(r) for r in args.stages.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "datasets": {
            "scale": {
                "simulate": {
                    "box": args.box, "pixel_size": args.pixel_size, "n_particles": args.n,
                    "seed": 0,
                }
            }
        },
        "preprocess": {"chunk_size": args.chunk_size},
        "reconstruction": {
            "stages_A": stages_A, "seeds": [1],
            "max_iterations": max(args.iterations, 1), "min_iterations": max(args.iterations, 1),
        },
    }
    (args.workdir / "config.yaml").write_text(yaml.safe_dump(config))
    results = args.workdir / "results" / "scale"
    bench = results / "benchmarks"
    steps = [
        ("simulate", "results/scale/simulated/particles.star", "simulate.tsv", args.n),
        ("preprocess", "results/scale/preprocess/particles.star", "preprocess.tsv", args.n),
        ("stage_stacks", "results/scale/preprocess/stage1.mrcs", "stage_stacks.tsv", args.n),
    ]
    if args.iterations > 0:
        steps.append(("reconstruct_stage", "results/scale/abinitio/seed1/stage1/volume.mrc",
                      "reconstruct_seed1_stage1.tsv", None))
    figures = {"n_particles": args.n, "box": args.box, "stages_A": stages_A}
    for name, target, tsv, n_images in steps:
        step = timed_snakemake(args.workdir, target, args.cores)
        step.update(rule_benchmark(bench / tsv))
        if n_images is None:
            rows = read_history(results / "abinitio/seed1/stage1/history.tsv")
            minibatch = default_reconstruction_config()["minibatch_size"]
            n_images = int(rows[-1]["iteration"]) * minibatch
            step["iterations"] = len(rows)
        figures[name] = step
        report(name, step, n_images)

    # The crops as the per-stage jobs made them: one process and one read of the stack each.
    old = args.workdir / "per_stage"
    old.mkdir(exist_ok=True)
    per_stage, identical = [], True
    for k, resolution in enumerate(stages_A, start=1):
        out = old / f"stage{k}.mrcs"
        per_stage.append(timed_python(
            CROP_ONE_STAGE, str(results / "preprocess/particles.mrcs"),
            str(results / "preprocess/info.json"), str(resolution), str(out),
            str(args.chunk_size)))
        identical &= same_stack(out, results / f"preprocess/stage{k}.mrcs")
        out.unlink()
    step = {"job_s": sum(p["job_s"] for p in per_stage),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in per_stage),
            "per_stage_s": [round(p["job_s"], 2) for p in per_stage],
            "identical_to_stage_stacks": bool(identical)}
    figures["crops_per_stage"] = step
    report("crops_per_stage", step, args.n)
    figures["crops_speedup"] = step["job_s"] / figures["stage_stacks"]["job_s"]
    print(f"{'':22s} one pass is {figures['crops_speedup']:.2f} x faster; the same files: "
          f"{identical}", flush=True)

    truth_star = results / "simulated/particles.star"
    jittered = results / "simulated/jittered.star"
    jittered_star(truth_star, jittered)
    passes = [("validate_poses", REPO)]
    if args.before_repo:
        passes.insert(0, ("validate_poses_before", args.before_repo.resolve()))
    for name, repo in passes:
        step = timed_python(VALIDATE_POSES, str(truth_star), str(jittered),
                            str(args.pixel_size), repo=repo)
        step["median_deg"] = json.loads(step.pop("stdout"))["median_deg"]
        figures[name] = step
        report(name, step, args.n)
    if args.align:
        step = timed_python(VALIDATE_ALIGN, str(results / "simulated/truth.mrc"))
        step["fsc0143_A"] = json.loads(step.pop("stdout"))["fsc0143_A"]
        figures["validate_align"] = step
        report("validate_align", step, None)
    for step in figures.values():
        if isinstance(step, dict):
            step.pop("stdout", None)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
