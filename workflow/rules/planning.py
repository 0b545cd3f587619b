"""Each dataset's coarse-to-fine stages, decided when the workflow is parsed, before any job runs.

Standard library only: the main Snakemake process may not have cryoday's environment (with
``--sdm conda`` the package lives only in the jobs' environment), so the pixel size and box of a
user's particles are peeked here from the STAR file and the first stack's header, by the same
rules as ``cryoday.io.read_particles``: the STAR file's pixel size (the optics table's
``rlnImagePixelSize``, else the particles' ``rlnImagePixelSize`` or ``rlnPixelSize``, else
``rlnDetectorPixelSize`` (um) / ``rlnMagnification``), else the config's ``pixel_size``, else the
stack header's voxel size. The peek reads the particles' first row only (RELION 3.0 files repeat
the value on every row) and stops there once it has seen the optics table.
"""

from __future__ import annotations

import math
import re
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path

# Stages within this fraction of the finest resolution count as at it (a config's 10 A at
# 5 A/px, whatever the float rounding).
TOLERANCE = 1e-6


class PlanError(ValueError):
    """A stage list that no data set could use; the message is one line naming the key."""


@dataclass(frozen=True)
class Plan:
    """The stages a dataset runs (A, coarse first) and what was changed from the config's."""

    stages_A: list
    requested_A: list
    finest_A: float | None
    note: str


def check_decreasing(stages_A) -> None:
    """Refuse a stage list that does not strictly decrease (coarse to fine)."""
    for i in range(1, len(stages_A)):
        if not stages_A[i] < stages_A[i - 1]:
            raise PlanError(
                f"reconstruction.stages_A must decrease strictly, coarse to fine (got "
                f"{list(stages_A)}: stage {i + 1} at {stages_A[i]} A follows {stages_A[i - 1]} A)"
            )


# cryoday.symmetry.canonical_name's names (a twin: this module may not import cryoday).
_GROUP = re.compile(r"^\s*([CD])(\d{1,3})\s*$|^\s*(T|O|I[1-4]?)\s*$", re.IGNORECASE)


def check_symmetry(value, key: str, auto: bool = True) -> None:
    """Refuse a point-group name cryoday does not know (``auto`` allowed when ``auto``),
    naming the config key; the names and their rule are ``cryoday.symmetry.canonical_name``'s."""
    if auto and isinstance(value, str) and value.strip().lower() == "auto":
        return
    match = _GROUP.match(value) if isinstance(value, str) else None
    if match and match.group(1):
        ok = int(match.group(2)) >= (1 if match.group(1).upper() == "C" else 2)
    else:
        ok = match is not None
    if not ok:
        raise PlanError(f"{key}: {value!r} is not a point group: use Cn, Dn, T, O, I "
                        f"(RELION's names, e.g. C1, C4, D7){' or auto' if auto else ''}")


def finest_resolution(box: int | None, pixel_size: float) -> float:
    """The finest stage resolution (A) images of ``box`` px at ``pixel_size`` A/px allow.

    Nyquist, ``2 x pixel_size``, for an even box; an odd box is cropped to the even box below
    (``cryoday.preprocess.stage_box``), whose Nyquist is slightly coarser.
    """
    if box and box % 2:
        return 2.0 * pixel_size * box / (box - 1)
    return 2.0 * pixel_size


def fit_stages(stages_A, finest_A: float | None) -> Plan:
    """The stages clamped to ``finest_A``: finer ones (and ones at it, within rounding) become
    ``finest_A``, and repeats after clamping are dropped; ``None`` leaves them as they are."""
    # The config's numbers are kept as given (an int stays an int), so that a plan that changes
    # nothing gives the rules the params they had before.
    requested = list(stages_A)
    if finest_A is None:
        return Plan(requested, requested, None, "")
    fitted, finer, changes = [], [], []
    for stage in requested:
        value = finest_A if stage <= finest_A * (1 + TOLERANCE) else stage
        kept = not fitted or value < fitted[-1]
        if kept:
            fitted.append(value)
        if stage < finest_A * (1 - TOLERANCE):
            finer.append(stage)
            changes.append(f"{stage:g} A clamped to it" if kept else
                           f"{stage:g} A dropped ({finest_A:g} A is a stage already)")
    note = ""
    if changes:
        note = (f"{_list(finer)} A finer than the data's Nyquist limit ({finest_A:g} A): "
                f"{', '.join(changes)}; the stages are {_list(fitted)} A")
    return Plan(fitted, requested, finest_A, note)


def _list(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


# ---------------------------------------------------------------------- STAR and MRC peeks


@dataclass
class _Table:
    block: str
    columns: list
    rows: list  # every row; only the first of a particle table (it may hold millions)

    @property
    def has_images(self) -> bool:
        return "rlnImageName" in self.columns

    def first(self, name):
        if not self.rows or name not in self.columns:
            return None
        row, i = self.rows[0], self.columns.index(name)
        return row[i] if i < len(row) else None

    def numbers(self, name) -> list:
        """Every row's ``name`` as a positive number; empty when any row has none."""
        if name not in self.columns:
            return []
        i = self.columns.index(name)
        values = [_number(row[i]) if i < len(row) else None for row in self.rows]
        return values if values and all(values) else []


def _number(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _split(line: str) -> list:
    try:
        return shlex.split(line)
    except ValueError:  # an unbalanced quote: cryoday's reader will say where
        return line.split()


def _star_tables(path: Path) -> list:
    """The tables of a STAR file: loops, and key-value blocks as one-row tables."""
    tables = []
    table, in_loop = None, False
    with open(path, errors="replace") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("data_"):
                table, in_loop = _Table(line[5:], [], []), False
                tables.append(table)
            elif table is None:
                continue
            elif line.split()[0] == "loop_":
                if table.columns:  # a second loop in one block
                    table = _Table(table.block, [], [])
                    tables.append(table)
                in_loop = True
            elif line.startswith("_"):
                name, _, value = line[1:].partition(" ")
                table.columns.append(name.strip())
                if not in_loop:
                    fields = _split(value.split("#")[0]) or [""]
                    table.rows = [(table.rows[0] if table.rows else []) + fields[:1]]
            elif in_loop and table.columns and not (table.has_images and table.rows):
                table.rows.append(_split(line))
                if table.has_images and any(_is_optics(t) for t in tables):
                    break  # the rest is particle rows (an optics table after them is read on)
    return [t for t in tables if t.columns]


def _is_optics(table: _Table) -> bool:
    return bool(table.rows) and (table.block == "optics" or (
        "rlnOpticsGroup" in table.columns and not table.has_images))


def _mrc_header(path: Path):
    """``(nx, voxel size or None)`` from an MRC file's header, or None when unreadable."""
    try:
        with open(path, "rb") as f:
            header = f.read(56)
    except OSError:
        return None
    if len(header) < 56:
        return None
    for order in "<>":
        nx, ny, _, mode = struct.unpack(order + "4i", header[:16])
        if 0 < nx < 1 << 16 and 0 < ny < 1 << 16 and 0 <= mode < 32:
            mx = struct.unpack(order + "i", header[28:32])[0]
            cella = struct.unpack(order + "f", header[40:44])[0]
            voxel = cella / mx if mx > 0 and math.isfinite(cella) and cella > 0 else None
            return nx, voxel
    return None


@dataclass(frozen=True)
class Peek:
    """What a particle STAR file (and its first stack's header) say of the images' sampling."""

    pixel_size: float | None
    box: int | None
    source: str


def peek_particles(star_path, override: float | None = None) -> Peek:
    """The pixel size (A) and box (px) of a particle STAR file, read cheaply.

    ``override`` is the config's ``pixel_size``, used when the file has none (as
    ``cryoday.io.read_particles`` does). ``pixel_size`` is None when nothing tells; ``box`` is
    None when neither the optics table's ``rlnImageSize`` nor the first stack's header tells.
    """
    path = Path(star_path)
    tables = _star_tables(path)
    with_images = [t for t in tables if t.has_images]
    particles = next((t for t in with_images if t.block == "particles"),
                     with_images[0] if with_images else None)
    if particles is None:
        return Peek(None, None, "no particle table")
    optics = next((t for t in tables if t.block == "optics" and t.rows),
                  next((t for t in tables if _is_optics(t)), None))
    pixel_size, source, box = None, "", None
    if optics is not None:
        sizes = sorted(optics.numbers("rlnImagePixelSize"))
        if sizes:
            pixel_size, source = sizes[len(sizes) // 2], "rlnImagePixelSize of the optics table"
        boxes = optics.numbers("rlnImageSize")
        box = int(boxes[0]) if boxes else None
    for column in ("rlnImagePixelSize", "rlnPixelSize"):
        if pixel_size is None and _number(particles.first(column)):
            pixel_size, source = _number(particles.first(column)), f"{column} of the particles"
    detector = _number(particles.first("rlnDetectorPixelSize"))
    magnification = _number(particles.first("rlnMagnification"))
    if pixel_size is None and detector and magnification:
        pixel_size = detector * 1e4 / magnification
        source = "rlnDetectorPixelSize / rlnMagnification of the particles"
    if pixel_size is None and override:
        pixel_size, source = float(override), "the config's pixel_size"
    stack = _first_stack(path, particles.first("rlnImageName"))
    header = _mrc_header(stack) if stack else None
    if header:
        box = box or header[0]
        if pixel_size is None and header[1]:
            pixel_size, source = header[1], f"the voxel size in {stack.name}'s header"
    return Peek(pixel_size, box, source)


def _first_stack(star: Path, image_name) -> Path | None:
    if not image_name:
        return None
    stack = Path(image_name.partition("@")[2] if "@" in image_name else image_name)
    return stack if stack.is_absolute() else star.parent / stack


def plan_dataset(name: str, dataset: dict, stages_A) -> tuple[Plan, str]:
    """A dataset's stages and the line to say about them at the start ('' when nothing to say).

    ``dataset`` is the dataset's validated config block (defaults filled in). A simulation's
    sampling is in its block; a user's is peeked from the STAR file, and when that cannot tell
    the stages are used as given (preprocessing then judges the file).
    """
    if "simulate" in dataset:
        box, pixel_size = dataset["simulate"]["box"], dataset["simulate"]["pixel_size"]
        where = f"{box} px at {pixel_size:g} A/px in its simulate block"
    else:
        star = Path(dataset["particles"])
        peek = None
        if star.is_file():
            try:
                peek = peek_particles(star, dataset.get("pixel_size"))
            except (OSError, UnicodeError) as exc:
                peek = Peek(None, None, str(exc))
        if peek is None or peek.pixel_size is None:
            why = peek.source if peek else "not found"
            return fit_stages(stages_A, None), (
                f"dataset {name}: the pixel size of {star} cannot be read before preprocessing "
                f"({why or 'none found'}); its stages are not fitted to its Nyquist limit")
        box, pixel_size = peek.box, peek.pixel_size
        where = (f"{box} px" if box else "images") + f" at {pixel_size:g} A/px from {peek.source}"
    plan = fit_stages(stages_A, finest_resolution(box, pixel_size))
    return plan, (f"dataset {name}, {where}: reconstruction.stages_A {plan.note}"
                  if plan.note else "")
