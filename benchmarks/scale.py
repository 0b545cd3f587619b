"""Scale benchmark: simulate, preprocess and run one reconstruction stage on a large set.

Runs the real workflow (Snakemake, one job after another) on a simulated data set of
``--n`` particles of ``--box`` px, each step under ``/usr/bin/time -v``, and prints each step's
peak memory (max RSS of any process of the step) and throughput (images per second). Nothing
is asserted: the figures go into the issue notes.

    python benchmarks/scale.py --n 100000 --box 128 --workdir /tmp/cryoday-scale

The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cryoday.records import read_history
from cryoday.stage_config import default_reconstruction_config

REPO = Path(__file__).resolve().parents[1]


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
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024}


def rule_benchmark(path: Path) -> dict:
    with open(path) as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    return {"job_s": float(row["s"]), "job_max_rss_mb": float(row["max_rss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="particles")
    parser.add_argument("--box", type=int, default=128, help="box in px")
    parser.add_argument("--pixel-size", type=float, default=2.8, help="A/px")
    parser.add_argument("--stage-resolution", type=float, default=40.0, help="A")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of the stage")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cryoday-scale"))
    args = parser.parse_args()

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
        "reconstruction": {
            "stages_A": [args.stage_resolution], "seeds": [1],
            "max_iterations": args.iterations, "min_iterations": args.iterations,
        },
    }
    (args.workdir / "config.yaml").write_text(yaml.safe_dump(config))
    bench = args.workdir / "results" / "scale" / "benchmarks"
    steps = [
        ("simulate", "results/scale/simulated/particles.star", "simulate.tsv", args.n),
        ("preprocess", "results/scale/preprocess/particles.star", "preprocess.tsv", args.n),
        ("downsample", "results/scale/preprocess/stage1.mrcs", "downsample_stage1.tsv", args.n),
        (
            "reconstruct_stage",
            "results/scale/abinitio/seed1/stage1/volume.mrc",
            "reconstruct_seed1_stage1.tsv",
            None,
        ),
    ]
    figures = {"n_particles": args.n, "box": args.box}
    for name, target, tsv, n_images in steps:
        step = timed_snakemake(args.workdir, target, args.cores)
        step.update(rule_benchmark(bench / tsv))
        if n_images is None:
            rows = read_history(args.workdir / "results/scale/abinitio/seed1/stage1/history.tsv")
            minibatch = default_reconstruction_config()["minibatch_size"]
            n_images = int(rows[-1]["iteration"]) * minibatch
            step["iterations"] = len(rows)
        step["images_per_s"] = n_images / step["job_s"]
        figures[name] = step
        print(f"{name:18s} job {step['job_s']:8.1f} s  peak RSS {step['peak_rss_mb']:8.0f} MB  "
              f"{step['images_per_s']:10.0f} images/s", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
