"""The cost of a stage's iterations with a point group against C1, on one stage stack of a run.

From a finished (or preprocessed) run's ``DIR/preprocess/stage{K}.mrcs``/``.json`` and
``particles.star``, runs ``--iterations`` SAGD iterations of :func:`cryoday.stage.run_stage`
(the schema's defaults, ``max_iterations = min_iterations = --iterations``, no held-out checks
until the last) from the same random start, once per group of ``--groups`` and with importance
sampling on and off (``--is``: ``on``, ``off`` or ``both``). Prints per run the grid size, the
wall time per iteration (the whole stage, final pose pass included, divided by the
iterations), and the time spent symmetrising (one symmetrisation per iteration, timed apart on
the stage's box). No asserts: figures for the issue notes.

    python benchmarks/symmetry.py /tmp/run/results/d7 --stage 2 --groups C1 D7 --is both
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cryoday import initial, io, symmetry
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="results/<dataset> of a run")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--groups", nargs="+", default=["C1", "D7"])
    parser.add_argument("--is", dest="sampling", choices=["on", "off", "both"], default="both")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--particles", type=int, default=1000)
    args = parser.parse_args()

    pre = args.run / "preprocess"
    info = json.loads((pre / f"stage{args.stage}.json").read_text())
    box, pixel_size, resolution = info["box"], info["pixel_size"], info["resolution_A"]
    particles = io.read_particles(pre / "particles.star")
    n = min(args.particles, len(particles.table))
    stack = io.open_stack(pre / f"stage{args.stage}.mrcs")
    images = np.asarray(io.read_rows(stack, np.arange(n)), np.float32)
    ctf = {k: (v[:n] if np.ndim(v) else v) for k, v in io.ctf_params(particles).items()}
    start = initial.random_blobs(box, pixel_size, seed=1)
    rows = np.arange(n)
    sampling = {"on": [True], "off": [False], "both": [True, False]}[args.sampling]
    out = []
    print(f"stage {args.stage}: {resolution:g} A, box {box}, {n} particles, "
          f"{args.iterations} iterations")
    print(f"{'group':>6} {'IS':>4} {'grid points':>12} {'evaluated':>10} {'s/iteration':>12} "
          f"{'symmetrise s':>13}")
    for group in args.groups:
        sym_s = 0.0
        if symmetry.canonical_name(group) != "C1":
            t = time.perf_counter()
            symmetry.symmetrise(start, group)
            sym_s = time.perf_counter() - t
        for on in sampling:
            section = default_reconstruction_config(
                max_iterations=args.iterations, min_iterations=args.iterations,
                heldout_every=args.iterations, importance_sampling=on, symmetry=group)
            config = StageConfig.from_config(section, args.stage, 1)
            t = time.perf_counter()
            result = run_stage(start, images, ctf, info["noise_sigma"], pixel_size, resolution,
                               rows[50:], rows[:50], config, log=lambda *_: None,
                               scale_start=True)
            wall = time.perf_counter() - t
            last = result.history[-1]
            row = {"group": group, "importance_sampling": on, "grid_points": last["n_full"]
                   // config.minibatch_size, "evaluated": last["n_evaluated"] / last["n_full"],
                   "s_per_iteration": wall / args.iterations, "symmetrise_s": sym_s}
            out.append(row)
            print(f"{group:>6} {'on' if on else 'off':>4} {row['grid_points']:>12,} "
                  f"{row['evaluated']:>10.2%} {row['s_per_iteration']:>12.2f} {sym_s:>13.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
