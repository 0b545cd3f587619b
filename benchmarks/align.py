"""Map alignment benchmark: time and figures of ``align.find_alignment`` per pair of maps.

The pairs are the ones validation aligns on the demo (the final map against the truth, and the
two starts' last-stage maps rescaled to the final box as ``validation.run_metrics`` does), the
same at 128 px (both maps Fourier-upsampled with ``initial.resample_for_stage``), and known
cases: the truth turned and shifted by a known transform, of either hand, at 64 and 128 px,
where the error of the transform found is printed too.

For before/after figures run it with another checkout's ``cryoday`` (``--repo``) and save the
results (``--json``); a second run with ``--compare`` prints the rotation difference (degrees),
shift difference (px) and FSC resolution change against the saved results. Nothing is asserted.

    git archive main | tar -x -C /tmp/before   # a checkout of the code to compare with
    python benchmarks/align.py --repo /tmp/before --json /tmp/align_before.json
    python benchmarks/align.py --compare /tmp/align_before.json --json /tmp/align_after.json

Each pair's line is printed as it finishes; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DEMO = Path("/work/after3/results/demo")
# A fixed "known" transform: a generic rotation (not near any grid point) and a sub-pixel shift.
KNOWN_ROTVEC = np.array([0.9, -1.7, 0.6])
KNOWN_SHIFT = np.array([2.3, -1.6, 0.8])


def known_pair(v, flipped, n):
    """(moved, reference, expected alignment rotation, expected shift): ``moved`` is ``v``
    (mirrored along z if ``flipped``) turned by R and shifted by t, at ``n`` px."""
    from scipy.spatial.transform import Rotation

    from cryoday.align import _transform
    from cryoday.initial import resample_for_stage

    ref = v if v.shape[0] == n else resample_for_stage(v, n)
    rotation = Rotation.from_rotvec(KNOWN_ROTVEC).as_matrix()
    shift = KNOWN_SHIFT * n / 64
    src = ref[::-1] if flipped else ref
    moved = _transform(np.ascontiguousarray(src, np.float64), rotation, shift, order=3)
    # moved(x) = src(R^T (x - c - t) + c) is undone by R^T then the shift -R^T t. The mirror
    # v[::-1] takes z to n - 1 - z, i.e. J about the centre voxel then one voxel down
    # (J = diag(1, 1, -1), e = (0, 0, 1)): undone by J R^T J and -J R^T (e + t) - e.
    expected_r, expected_t = rotation.T, -rotation.T @ shift
    if flipped:
        j, e = np.diag([1.0, 1.0, -1.0]), np.array([0.0, 0.0, 1.0])
        expected_r, expected_t = j @ rotation.T @ j, -j @ rotation.T @ (e + shift) - e
    return moved.astype(np.float32), ref.astype(np.float32), expected_r, expected_t


def pairs(sizes, only):
    from cryoday import io
    from cryoday.fourier import rescale_volume
    from cryoday.initial import resample_for_stage

    final, ps = io.read_map(DEMO / "final/volume.mrc")
    truth, _ = io.read_map(DEMO / "simulated/truth.mrc")
    seeds = []
    for s in (1, 2):
        v, voxel = io.read_map(DEMO / f"abinitio/seed{s}/stage6/volume.mrc")
        seeds.append(rescale_volume(v, voxel, final.shape[0], ps))
    for n in sizes:
        scale = n / final.shape[0]

        def up(v, n=n):
            return v if n == v.shape[0] else resample_for_stage(v, n)

        cases = [(f"final_vs_truth_{n}", up(final), up(truth), None, None),
                 (f"seed1_vs_seed2_{n}", up(seeds[0]), up(seeds[1]), None, None)]
        for flipped in (False, True):
            moved, ref, r, t = known_pair(truth, flipped, n)
            cases.append((f"known_{'mirrored' if flipped else 'same'}_{n}", moved, ref, r, t))
        for name, moving, reference, r, t in cases:
            if only and not any(o in name for o in only):
                continue
            yield name, moving, reference, ps / scale, r, t


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=None,
                        help="a checkout whose cryoday to time (default: this one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--only", nargs="*", default=[], help="substrings of pair names")
    parser.add_argument("--json", type=Path, default=None, help="save the figures here")
    parser.add_argument("--compare", type=Path, default=None,
                        help="figures saved by an earlier run, to compare against")
    args = parser.parse_args()
    root = (args.repo or Path(__file__).resolve().parents[1]).resolve()
    sys.path.insert(0, str(root))
    from scipy.spatial.transform import Rotation

    import cryoday
    from cryoday.align import apply_alignment, find_alignment
    from cryoday.fsc import fsc, resolution_at

    assert Path(cryoday.__file__).resolve().is_relative_to(root), cryoday.__file__
    before = json.loads(args.compare.read_text()) if args.compare else {}
    figures = {}
    for name, moving, reference, pixel_size, r, t in pairs(args.sizes, args.only):
        start = time.perf_counter()
        a = find_alignment(moving, reference, pixel_size)
        wall = time.perf_counter() - start
        freq, curve = fsc(apply_alignment(moving, a), reference, pixel_size)
        f = {"wall_s": round(wall, 2), "flipped": bool(a.flipped),
             "correlation": round(float(a.correlation), 5),
             "rotvec": Rotation.from_matrix(a.rotation).as_rotvec().round(5).tolist(),
             "shift_px": np.round(a.shift_px, 3).tolist(),
             "fsc0143_A": round(resolution_at(freq, curve, 0.143), 3),
             "fsc05_A": round(resolution_at(freq, curve, 0.5), 3)}
        if r is not None:
            f["error_deg"] = round(float(np.degrees(
                Rotation.from_matrix(a.rotation @ r.T).magnitude())), 3)
            f["shift_error_px"] = round(float(np.linalg.norm(a.shift_px - t)), 3)
        if name in before:
            b = before[name]
            rb = Rotation.from_rotvec(b["rotvec"]).as_matrix()
            f["vs_before"] = {
                "rotation_deg": round(float(np.degrees(
                    Rotation.from_matrix(a.rotation @ rb.T).magnitude())), 3),
                "shift_px": round(float(np.linalg.norm(a.shift_px - np.array(b["shift_px"]))),
                                  3),
                "same_hand": b["flipped"] == f["flipped"],
                "fsc0143_A": round(f["fsc0143_A"] - b["fsc0143_A"], 3),
                "fsc05_A": round(f["fsc05_A"] - b["fsc05_A"], 3),
                "speedup": round(b["wall_s"] / wall, 1)}
        figures[name] = f
        print(name, json.dumps(f), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
