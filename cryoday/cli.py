"""The ``cryoday`` command: tools users run by hand, next to the Snakemake pipeline.

    cryoday reconstruct PARTICLES.star -o MAP.mrc [--box N] [--max-resolution A] [--half 1|2]
    cryoday fsc MAP1 MAP2 [--align] [--pixel-size A]
    cryoday symmetry MAP [--group D7|auto] [--half1 H1 --half2 H2] [--out ALIGNED.mrc]

Each command is a module-level pair ``add_args(parser)`` / ``main(args)``, as cryoDRGN does.
Every argument is checked before any work: a bad one, or bad input files, print one line naming
the problem and exit with status 2; an unexpected error (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from cryoday.errors import InputError

log = logging.getLogger("cryoday.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block) pointing at ``--help``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, minimum=None, strict=True):
    """An argparse type: ``kind`` (int or float), finite, above (or at) ``minimum``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not np.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'above' if strict else 'at least'} {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _subset(text: str) -> tuple[int, int | None]:
    """``FIRST:LAST`` (0-based, LAST excluded; either may be empty) as a pair of ints."""
    first, colon, last = text.partition(":")
    try:
        pair = (int(first) if first.strip() else 0, int(last) if last.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST:LAST (e.g. 0:1000)") from None
    if not colon or pair[0] < 0 or (pair[1] is not None and pair[1] <= pair[0]):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not FIRST:LAST with 0 <= FIRST < LAST (e.g. 0:1000)")
    return pair


def add_reconstruct_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="RELION STAR file with poses (rlnAngleRot/Tilt/Psi), "
                        "or a cryoSPARC .cs with alignments3D/pose and shift")
    parser.add_argument("-o", "--output", required=True, help="output map (.mrc)")
    parser.add_argument("--box", type=_number(int, 8, strict=False),
                        help="output box in px, at most the images' box (default: the images')")
    parser.add_argument("--pixel-size", type=_number(float, 0),
                        help="pixel size in A, if the STAR file has none")
    parser.add_argument("--max-resolution", type=_number(float, 0),
                        help="highest resolution used (A)")
    parser.add_argument("--subset", type=_subset,
                        help="particle rows FIRST:LAST (0-based, LAST excluded)")
    parser.add_argument("--half", type=int, choices=(1, 2),
                        help="one of two random halves (gold-standard half maps)")
    parser.add_argument("--wiener", type=_number(float, 0), default=1e-3,
                        help="regularisation relative to the mean CTF^2 weight (default 1e-3)")
    parser.add_argument("--chunk-size", type=_number(int, 1, strict=False), default=500)
    parser.add_argument("--sym", type=_group_name, default="C1",
                        help="point group (RELION's names: C1, C4, D7, T, O, I); each image is "
                        "inserted at its pose's |G| equivalents (default C1)")


def reconstruct_main(args) -> None:
    from cryoday import io

    io.check_writable(args.output)
    particles = io.read_particles(args.particles, pixel_size=args.pixel_size)
    pose = io.poses(particles)
    if pose is None:
        raise InputError(f"{args.particles}: no rlnAngleRot/rlnAngleTilt/rlnAnglePsi columns; "
                         "known-pose reconstruction needs poses")
    rows = np.arange(len(particles))
    if args.subset:
        first, last = args.subset
        if first >= len(rows):
            raise InputError(f"--subset {first}:{'' if last is None else last} starts past the "
                             f"last of the {len(rows)} particles of {args.particles}")
        rows = rows[first:last]
    if args.half:
        rows = rows[_half_sets(len(rows))[args.half - 1]]
    if len(rows) == 0:
        raise InputError("the particle subset is empty")
    box = args.box or particles.box
    if box > particles.box:
        raise InputError(f"--box {box} is larger than the images' {particles.box} px; the box "
                         "can only shrink (Fourier cropping)")
    pixel_size = particles.pixel_size * particles.box / box
    if args.max_resolution and args.max_resolution < 2 * pixel_size:
        log.warning("--max-resolution %.2f A is finer than the Nyquist limit of %d px at "
                    "%.4f A/px (%.2f A); using the Nyquist limit", args.max_resolution,
                    box, pixel_size, 2 * pixel_size)
    # Imported after the checks: bad arguments are refused without compiling any kernel.
    from cryoday.geometry import euler_to_matrix
    from cryoday.reconstruct import reconstruct

    ctf = {k: v[rows] for k, v in io.ctf_params(particles).items()}
    shifts = np.stack([pose["shift_x"], pose["shift_y"]], axis=1)[rows] / pixel_size
    rotations = euler_to_matrix(pose["rot"], pose["tilt"], pose["psi"])[rows]
    with io.ImageSource(particles) as source:
        volume = reconstruct(lambda r: source.read(rows[r]), len(rows), rotations, shifts, ctf,
                             pixel_size, box, args.max_resolution, args.wiener, args.chunk_size,
                             symmetry=args.sym)
    io.write_map(args.output, volume, pixel_size)
    log.info("wrote %s: %d particles, %d px at %.4f A/px%s", args.output, len(rows), box,
             pixel_size, "" if args.sym == "C1" else f", symmetry {args.sym}")


def _group_name(text: str) -> str:
    """An argparse type: a point group's name, in RELION's spelling."""
    from cryoday.symmetry import canonical_name  # no numba kernels there

    try:
        return canonical_name(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _group_or_auto(text: str) -> str:
    return "auto" if text.strip().lower() == "auto" else _group_name(text)


def _half_sets(n: int):
    from cryoday.reconstruct import half_sets  # numba kernels: imported only when needed

    return half_sets(n)


def add_fsc_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map1")
    parser.add_argument("map2")
    parser.add_argument("--pixel-size", type=_number(float, 0),
                        help="A/px if the headers have none")
    parser.add_argument("--align", action="store_true",
                        help="first find the rotation, shift and hand between the maps")


def fsc_main(args) -> None:
    from cryoday import io

    a, pa = io.read_map(args.map1)
    b, _ = io.read_map(args.map2)
    pixel_size = args.pixel_size or pa
    if not pixel_size:
        raise InputError(f"{args.map1}: no voxel size in the header; pass --pixel-size")
    if a.shape != b.shape:
        raise InputError(f"{args.map1} is {a.shape[0]} px but {args.map2} is {b.shape[0]} px")
    from cryoday.align import fsc_after_alignment
    from cryoday.fsc import fsc, resolution_at

    if args.align:
        alignment, freq, curve, _ = fsc_after_alignment(a, b, pixel_size)
        print(f"alignment: correlation {alignment.correlation:.3f}, "
              f"{'mirrored' if alignment.flipped else 'same hand'}")
    else:
        freq, curve = fsc(a, b, pixel_size)
    print(f"FSC 0.143: {resolution_at(freq, curve, 0.143):.2f} A")
    print(f"FSC 0.5:   {resolution_at(freq, curve, 0.5):.2f} A")


def add_symmetry_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="a C1 map (.mrc)")
    parser.add_argument("--group", type=_group_or_auto, default="auto",
                        help="a point group to align (C4, D7, T, O, I...), or auto: try C2-C8, "
                        "D2-D8, T, O, I and choose (default auto)")
    parser.add_argument("--half1", help="half map 1: consistency across halves and FSC")
    parser.add_argument("--half2", help="half map 2 (with --half1)")
    parser.add_argument("--out", help="write the map turned onto RELION's symmetry axes here")
    parser.add_argument("--symmetrise", action="store_true",
                        help="also average the written map over the group")
    parser.add_argument("--tolerance", type=_number(float, 0),
                        help="how far below C1's self-consistency a group may score and be "
                        "accepted (default 0.05)")
    parser.add_argument("--keep-centre", action="store_true",
                        help="do not move the density's centre to the box centre first")
    parser.add_argument("--pixel-size", type=_number(float, 0),
                        help="A/px if the header has none")


def symmetry_main(args) -> None:
    from cryoday import io

    if (args.half1 is None) != (args.half2 is None):
        raise InputError("give both --half1 and --half2, or neither")
    if args.symmetrise and not args.out:
        raise InputError("--symmetrise applies to the map written with --out; give --out")
    if args.out:
        io.check_writable(args.out)
    volume, voxel = io.read_map(args.map)
    pixel_size = args.pixel_size or voxel
    if not pixel_size:
        raise InputError(f"{args.map}: no voxel size in the header; pass --pixel-size")
    halves = None
    if args.half1:
        halves = [io.read_map(path)[0] for path in (args.half1, args.half2)]
        for path, half in zip((args.half1, args.half2), halves):
            if half.shape != volume.shape:
                raise InputError(f"{path} is {half.shape[0]} px but {args.map} is "
                                 f"{volume.shape[0]} px")
    from cryoday.symmetry_search import TOLERANCE, align_to_axes, find_symmetry

    found = find_symmetry(volume, pixel_size, args.group,
                          *(halves if halves else (None, None)),
                          tolerance=TOLERANCE if args.tolerance is None else args.tolerance,
                          recentre=not args.keep_centre)
    print(f"reference (C1 self-consistency): {found.reference:.4f}; accepted: consistency >= "
          f"{found.reference - found.tolerance:.4f}")
    print(f"{'group':<6}{'order':>6}{'score':>8}{'consist.':>10}"
          + (f"{'FSC 0.143':>11}" if halves else ""))
    for c in found.candidates:
        mark = "  <-" if c is found.chosen else ""
        fsc_text = f"{c.fsc_A:>9.2f} A" if c.fsc_A is not None else ""
        print(f"{c.name:<6}{c.order:>6}{c.score:>8.4f}{c.consistency:>10.4f}{fsc_text}{mark}")
    print(f"symmetry: {found.chosen.name}")
    target = found.chosen
    if args.group != "auto":
        # A named group is the user's call: align to it even when the map falls short of it.
        target = found.candidates[-1]
        if target is not found.chosen:
            log.warning("the map is not %s within the tolerance (consistency %.4f < %.4f); "
                        "aligned to its best %s axes anyway", target.name, target.consistency,
                        found.reference - found.tolerance, target.name)
    if args.out and target.order > 1:
        io.write_map(args.out, align_to_axes(volume, found, target, symmetrise=args.symmetrise),
                     pixel_size)
        log.info("wrote %s: turned onto RELION's %s axes", args.out, target.name)
    elif args.out:
        log.warning("no symmetry found: %s not written", args.out)


COMMANDS = {
    "reconstruct": (add_reconstruct_args, reconstruct_main,
                    "known-pose reconstruction of a particle set (like relion_reconstruct)"),
    "fsc": (add_fsc_args, fsc_main, "Fourier shell correlation between two maps"),
    "symmetry": (add_symmetry_args, symmetry_main,
                 "find a map's point group and turn it onto RELION's symmetry axes"),
}


def main(argv=None) -> int:
    parser = _Parser(prog="cryoday", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.captureWarnings(True)
    try:
        COMMANDS[args.command][1](args)
    except InputError as exc:
        print(f"cryoday {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
