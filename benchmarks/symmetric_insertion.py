"""The final map's insertion with a point group: every equivalent inserted (``insert_expanded``)
against each pose inserted once and the sums symmetrised (``insert_symmetric``).

From a finished run's ``DIR/preprocess/particles.star`` and ``DIR/final/particles.star``,
inserts the first ``--particles`` particles at their best poses both ways, for each group of
``--groups``, and prints the wall times, their ratio and the FSC between the two maps (0.5 and
0.143 crossings, and its minimum below 0.8 Nyquist). No asserts: figures for the issue notes.

    python benchmarks/symmetric_insertion.py /tmp/run/results/paper --particles 5000 --groups D7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cryoday import io
from cryoday.fsc import fsc, resolution_at
from cryoday.geometry import euler_to_matrix
from cryoday.reconstruct import insert_expanded, insert_symmetric, solve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="results/<dataset> of a finished run")
    parser.add_argument("--particles", type=int, default=5000)
    parser.add_argument("--groups", nargs="+", default=["D7"])
    args = parser.parse_args()

    particles = io.read_particles(args.run / "preprocess" / "particles.star")
    pixel_size, box = float(particles.pixel_size), int(particles.box)
    final = io.read_particles(args.run / "final" / "particles.star", pixel_size=pixel_size,
                              check_stacks=False)
    n = min(args.particles, len(particles))
    pose = {k: np.asarray(v)[:n] for k, v in io.poses(final).items()}
    rotations = euler_to_matrix(pose["rot"], pose["tilt"], pose["psi"])
    shifts = np.stack([pose["shift_x"], pose["shift_y"]], axis=1) / pixel_size
    ctf = {k: (np.asarray(v)[:n] if np.ndim(v) else v)
           for k, v in io.ctf_params(particles).items()}
    with io.ImageSource(particles) as source:
        for group in args.groups:
            # Compiled before the clock starts (both ways share the insertion's kernels).
            insert_symmetric(source.read, 10, rotations[:10], shifts[:10],
                             {k: (v[:10] if np.ndim(v) else v) for k, v in ctf.items()},
                             pixel_size, box, group)
            times, maps = {}, {}
            for name, insert in (("symmetrised", insert_symmetric),
                                 ("expanded", insert_expanded)):
                start = time.perf_counter()
                sums = insert(source.read, n, rotations, shifts, ctf, pixel_size, box, group)
                times[name] = time.perf_counter() - start
                maps[name] = solve(sums)
            freq, curve = fsc(maps["symmetrised"], maps["expanded"], pixel_size)
            inner = (freq > 0) & (freq < 0.8 * freq.max())
            figures = {"group": group, "particles": n, "box": box,
                       "expanded_s": round(times["expanded"], 2),
                       "symmetrised_s": round(times["symmetrised"], 2),
                       "ratio": round(times["expanded"] / times["symmetrised"], 2),
                       "fsc_between_0.5_A": round(resolution_at(freq, curve, 0.5), 2),
                       "fsc_between_min_below_0.8_nyquist": round(float(curve[inner].min()), 4)}
            print(json.dumps(figures))


if __name__ == "__main__":
    main()
