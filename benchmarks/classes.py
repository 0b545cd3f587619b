"""The cost of a stage's iterations with K classes against one, from finished runs' stages.

For each of ``RUNS`` (``results/<dataset>`` of finished runs of one size, each with its own
``classes``), runs ``--iterations`` SAGD iterations of stage ``--stage`` of its first random
start from its previous stage's maps and state, as the workflow's stage would (the schema's
defaults with the run's class count; ``max_iterations = min_iterations = --iterations``; the
held-out check only at the last), and prints the wall time per iteration (the whole stage,
final pose and class pass included, divided by the iterations), the evaluated share of the
grid, the SAGD stored gradients' size and each figure's ratio to the first run's. No asserts:
figures for the issue notes.

    python benchmarks/classes.py results/junk1 results/pair2 results/junk3 --stage 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cryoday import initial, io, noise, records
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config


def stage_inputs(run: Path, stage: int):
    """The stage's images, CTFs, rows and start (the previous stage's class maps)."""
    pre = run / "preprocess"
    info = json.loads((pre / f"stage{stage}.json").read_text())
    particles = io.read_particles(pre / "particles.star")
    heldout = particles.table["cryodayHeldOut"].to_numpy().astype(bool)
    previous = run / f"abinitio/seed1/stage{stage - 1}"
    saved = records.read_classes(previous / "classes.npz")
    volumes = np.stack([initial.resample_for_stage(v, info["box"]) for v in saved["volumes"]])
    spectrum = noise.NoiseSpectrum.load(previous / "noise_spectrum.tsv")
    return (info, io.open_stack(pre / f"stage{stage}.mrcs"), io.ctf_params(particles),
            np.flatnonzero(~heldout), np.flatnonzero(heldout), volumes, previous / "state.npz",
            spectrum if np.any(spectrum.power != 1.0) else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="results/<dataset> of finished runs")
    parser.add_argument("--stage", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    print(f"stage {args.stage}, {args.iterations} iterations")
    print(f"{'run':>12} {'K':>3} {'s/iteration':>12} {'ratio':>6} {'evaluated':>10} "
          f"{'stored MB':>10}")
    out, first = [], None
    for run in args.runs:
        info, stack, ctf, train, held, volumes, state, spectrum = stage_inputs(run, args.stage)
        k = len(volumes)
        section = default_reconstruction_config(
            max_iterations=args.iterations, min_iterations=args.iterations,
            heldout_every=args.iterations, classes=k)
        config = StageConfig.from_config(section, args.stage, 1)
        t = time.perf_counter()
        result = run_stage(volumes if k > 1 else volumes[0], stack, ctf, info["noise_sigma"],
                           info["pixel_size"], info["resolution_A"], train, held, config,
                           sagd_state=state, log=lambda *_: None, noise=spectrum)
        wall = (time.perf_counter() - t) / args.iterations
        first = wall if first is None else first
        evaluated = float(np.mean([h["n_evaluated"] / h["n_full"] for h in result.history]))
        row = {"run": run.name, "classes": k, "s_per_iteration": wall,
               "ratio": wall / first, "evaluated": evaluated,
               "stored_MB": result.optimiser.stored.nbytes / 1e6}
        out.append(row)
        print(f"{run.name:>12} {k:>3} {wall:>12.2f} {row['ratio']:>6.2f} {evaluated:>10.3%} "
              f"{row['stored_MB']:>10.0f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
