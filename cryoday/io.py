"""Reading and writing the files users bring and get: RELION STAR files, MRC maps and stacks.

All file I/O of cryoday lives here. STAR files are parsed by ``starfile`` and MRC files by
``mrcfile``; this module adds RELION's semantics (optics groups, ``N@stack`` image names, pixel
size lookup, old and new origin columns), validation with messages that name the file, column and
particle, memory-mapped image access, and atomic writes.
"""

from __future__ import annotations

import contextlib
import errno
import linecache
import logging
import mmap
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryoday.errors import InputError, OutputError

log = logging.getLogger(__name__)

CTF_COLUMNS = ("rlnDefocusU", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
NUMERIC_COLUMNS = (
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnCtfBfactor", "rlnPhaseShift", "rlnImagePixelSize", "rlnPixelSize",
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
    "rlnOriginX", "rlnOriginY", "rlnOpticsGroup",
)


# ----------------------------------------------------------------------------- atomic writes


# Errors that mean "this place cannot take the file", whatever the writer was doing when it hit
# them; other OSErrors are only ours to rename when they name the file being written.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def write_error(path, exc: OSError) -> OutputError:
    """An :class:`OutputError` naming ``path`` (not the temporary file) for a failed write."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space or write the results elsewhere"
    return OutputError(f"{path}: cannot write it ({reason})")


def _is_write_failure(exc: OSError, *paths) -> bool:
    return exc.errno in _NO_ROOM or exc.filename is None or str(exc.filename) in map(str, paths)


def check_writable(path) -> Path:
    """Refuse, before any work, an output ``path`` that could never be written.

    Catches the mistakes a long run would otherwise meet at its end: a path that is a folder, a
    parent that is a file, a folder without write permission.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name for the output")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write it ({parent} is a file, not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write it (no write permission in {parent})")
    return path


def temporary_beside(path: Path, suffix: str) -> Path:
    """A new empty file next to ``path``, with the permissions a plain new file would get.

    ``mkstemp`` makes files only their owner can read; results renamed from them into place
    must be readable as the user's umask allows (a facility's group, a cluster's other nodes).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it into place only on clean exit.

    A killed or failing writer therefore never leaves a half-written ``path`` behind, and a
    write that fails for want of room or permission raises :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    tmp = temporary_beside(path, ".tmp" + path.suffix)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if _is_write_failure(exc, tmp, path):
            raise write_error(path, exc) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- STAR files


@dataclass
class Particles:
    """A particle set read from a STAR file, with optics merged onto every particle.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per particle in file order; optics-group columns copied onto each row.
    optics : pandas.DataFrame or None
        The optics table as read (RELION 3.1+), kept to write the set back.
    star_path : Path
    pixel_size : float
        Image pixel size in A.
    box : int or None
        Image size in px (None when stacks were not checked).
    stack_paths : numpy.ndarray
        Absolute path of each particle's stack (str).
    stack_index : numpy.ndarray
        0-based index of each particle within its stack (int64).
    """

    table: pd.DataFrame
    optics: pd.DataFrame | None
    star_path: Path
    pixel_size: float
    box: int | None
    stack_paths: np.ndarray
    stack_index: np.ndarray
    particle_columns: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    def image_names_from(self, directory) -> list[str]:
        """``rlnImageName`` values that find the same images from a STAR file in ``directory``.

        Image paths in a STAR file are relative to the file; one written elsewhere (the final
        particles, next to the map) must point back at the user's stacks.
        """
        directory = Path(directory).resolve()
        return [f"{index + 1:06d}@{os.path.relpath(path, directory)}"
                for index, path in zip(self.stack_index, self.stack_paths)]

    def original_table(self, table: pd.DataFrame | None = None) -> pd.DataFrame:
        """``table`` (default: ours) without the optics columns merged in, for writing back."""
        table = self.table if table is None else table
        if self.optics is None:
            return table
        merged = [c for c in self.optics.columns if c != "rlnOpticsGroup"]
        keep = [c for c in table.columns if c not in merged or c in self.particle_columns]
        return table[keep]


def _read_star_blocks(path: Path) -> dict[str, pd.DataFrame]:
    if path.is_dir():
        stars = sorted(q.name for q in path.glob("*.star"))[:3]
        hint = f" (it holds {', '.join(stars)})" if stars else ""
        raise InputError(f"{path}: is a directory, not a STAR file; give the particle STAR file "
                         f"itself{hint}")
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found")
    _scan_star_text(path)
    try:
        data = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises a variety of parser errors
        # starfile reads through linecache and leaves a failed file's lines cached: a fixed
        # file of the same size read again in this process would be parsed from stale lines.
        linecache.clearcache()
        raise InputError(f"{path}: not a readable STAR file ({exc})") from exc
    return {name: df for name, df in data.items() if isinstance(df, pd.DataFrame)}


_TOKENS = re.compile(r"""'[^']*'|"[^"]*"|\S+""")


def _scan_star_text(path: Path) -> None:
    """Judge a STAR file's text before parsing it, naming the line of what is wrong.

    The parser would read a file cut mid-row (a copy that stopped, a full disk) as a last row
    with missing values, which then surfaces as an unknown optics group or a missing stack; a
    block named twice (two files concatenated, a bad merge) would be silently dropped. Checks
    that every loop row has one value per column, that blocks are named once, and that the
    file is text.
    """
    if path.stat().st_size == 0:
        raise InputError(f"{path}: is empty (0 bytes), not a particle STAR file")
    with open(path, "rb") as f:
        if b"\0" in f.read(4096):
            raise InputError(f"{path}: is a binary file, not a STAR file (an MRC stack given as "
                             "the particles?)")
    seen: dict[str, int] = {}
    block, columns, in_header, in_loop = "", 0, False, False
    first_bad = None  # (line number, values, columns, block) of the first incomplete row
    last_row = None   # line number of the last loop row, and whether it ended with a newline
    last_content = 0
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            last_content = number
            if text.startswith("data_"):
                block = text.split()[0]
                if block in seen:
                    raise InputError(f"{path}: block {block} appears twice (lines {seen[block]} "
                                     f"and {number}); merge the tables or keep one")
                seen[block] = number
                in_loop = False
            elif text.startswith("loop_"):
                in_loop, in_header, columns = True, True, 0
            elif text.startswith("_"):
                if in_loop and in_header:
                    columns += 1
                else:
                    in_loop = False  # a key-value pair after a loop ends it
            elif in_loop:
                in_header = False
                values = len(_TOKENS.findall(text)) if ("'" in text or '"' in text) else len(
                    text.split())
                last_row = (number, line.endswith("\n"))
                if values != columns and first_bad is None:
                    first_bad = (number, values, columns, block)
    if first_bad is not None:
        number, values, columns, block = first_bad
        if number == last_content and values < columns:
            raise InputError(f"{path}: truncated at line {number}: its last row has {values} of "
                             f"the {columns} values of {block} (the file ends mid-row; copy or "
                             "write it again)")
        raise InputError(f"{path}: line {number} has {values} values but {block} has {columns} "
                         "columns; a row was cut or joined (a bad edit or merge?)")
    if last_row is not None and last_row[0] == last_content and not last_row[1]:
        log.warning("%s: does not end with a newline; if it was cut short, its last row (line "
                    "%d) may have lost digits", path, last_row[0])


def _particle_block(path: Path, blocks: dict[str, pd.DataFrame]) -> tuple[str, pd.DataFrame]:
    if "particles" in blocks and "rlnImageName" in blocks["particles"]:
        return "particles", blocks["particles"]
    candidates = [(n, b) for n, b in blocks.items() if "rlnImageName" in b.columns]
    if not candidates:
        raise InputError(
            f"{path}: no particle table (no data block has an rlnImageName column; "
            f"blocks found: {', '.join(blocks) or 'none'})"
        )
    if len(candidates) > 1:
        log.warning("%s: several blocks have rlnImageName (%s); using %s", path,
                    ", ".join(n for n, _ in candidates), candidates[0][0])
    return candidates[0]


def _check_numeric(path: Path, table: pd.DataFrame, block: str) -> None:
    what = "particle row" if block != "optics" else "row"
    for column in NUMERIC_COLUMNS:
        if column not in table.columns:
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna()
        bad |= values.isna() & table[column].isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            value = table[column].iloc[row]
            raise InputError(
                f"{path}: column {column} of data_{block} has a non-numeric value "
                f"{value if isinstance(value, str) else str(value)!r} at {what} {row + 1}"
            )
        table[column] = values


# Plausible values of the columns cryoday relies on, in RELION's units. Each rule is (test,
# verdict, reason): "refuse" for values no microscope gives (or that are surely in another
# unit: the reason says how to convert), "warn" for values that are possible but unusual.
# The thresholds sit far from real data (defocus 0.3-5 um, 100-300 kV, Cs 0-6 mm, amplitude
# contrast 0.07-0.1, 0.3-10 A/px), so a warning or refusal points at a unit or a typo.
def _defocus_rules(v, near_focus_ok):
    in_a = " (RELION's defocus is in A)"
    return [
        (v < 0, "refuse", ("is negative; RELION's defocus is positive for underfocus (did the "
                           "program that wrote it use another sign convention?)")),
        ((v == 0) & ~near_focus_ok, "refuse", "is 0 (no CTF estimate for this particle?)"),
        ((v > 0) & (v < 20) & ~near_focus_ok, "refuse",
         "is below 20 A: defocus in micrometres? multiply by 10,000" + in_a),
        ((v >= 20) & (v < 1000) & ~near_focus_ok, "refuse",
         "is below 1,000 A: defocus in nm or micrometres? multiply by 10 or 10,000" + in_a),
        ((v >= 0) & (v < 1000) & near_focus_ok, "warn",
         "is below 1,000 A (close to focus; accepted with the phase plate's phase shift)"),
        ((v > 100_000) & (v <= 1_000_000), "warn",
         "is above 10 micrometres, unusually far from focus"),
        (v > 1_000_000, "refuse", "is above 100 micrometres: not a defocus in A"),
    ]


def _voltage_rules(v):
    in_kv = " (RELION's voltage is in kV)"
    return [
        (v <= 0, "refuse", "is not a voltage (RELION's voltage is in kV, e.g. 300)"),
        ((v > 0) & (v < 1), "refuse", "is below 1 kV: in MV? multiply by 1,000" + in_kv),
        ((v >= 1) & (v < 20), "refuse", "is below 20 kV, no cryo-EM microscope's voltage" + in_kv),
        ((v >= 20) & (v < 60), "warn", "is below 60 kV, unusual for cryo-EM"),
        ((v > 1000) & (v < 10_000), "refuse", "is above 1,000 kV, no microscope's voltage"),
        (v >= 10_000, "refuse", "is above 10,000: in volts? divide by 1,000" + in_kv),
    ]


def _cs_rules(v):
    in_mm = " (RELION's Cs is in mm)"
    return [
        (v < -1, "refuse", "is below -1 mm, beyond what a Cs corrector tunes" + in_mm),
        ((v >= -1) & (v < 0), "warn", "is negative (a tuned Cs corrector?)"),
        ((v > 10) & (v <= 20), "warn", "is above 10 mm, unusually large"),
        ((v > 20) & (v < 100), "refuse", "is above 20 mm, no microscope's Cs" + in_mm),
        (v >= 100, "refuse", "is above 100: Cs in micrometres? divide by 1,000" + in_mm),
    ]


def _amplitude_rules(v):
    fraction = " (RELION's amplitude contrast is a fraction from 0 to 1, typically 0.07-0.1)"
    return [
        (v < 0, "refuse", "is negative" + fraction),
        ((v > 1) & (v <= 100), "refuse", "is above 1: a percentage? divide by 100" + fraction),
        (v > 100, "refuse", "is above 1" + fraction),
        ((v > 0.5) & (v <= 1), "warn", "is above 0.5, unusual (typically 0.07-0.1)"),
    ]


def _pixel_rules(v):
    # Above 20 A/px is a warning, not a refusal: 8x or 16x binned data (screening, huge
    # complexes) are legitimate and fine for a low-resolution ab initio map, and the stage
    # schedule is checked against their Nyquist frequency anyway. Above 100 A/px a 64 px box
    # would span 6.4 micrometres, a whole cell: that is a unit error, not a particle.
    in_a = " (RELION's pixel size is in A)"
    return [
        (v <= 0, "refuse", "is not a pixel size" + in_a),
        ((v > 0) & (v < 0.2), "refuse", "is below 0.2 A/px: in nm? multiply by 10" + in_a),
        ((v > 20) & (v <= 100), "warn", "is above 20 A/px: heavily binned data (or a unit error?)"),
        (v > 100, "refuse",
         "is above 100 A/px, no particle image's pixel size (in pm? or the micrograph's size?)"),
    ]


_VALUE_RULES = {
    "rlnDefocusU": _defocus_rules,
    "rlnDefocusV": _defocus_rules,
    "rlnVoltage": _voltage_rules,
    "rlnSphericalAberration": _cs_rules,
    "rlnAmplitudeContrast": _amplitude_rules,
    "rlnImagePixelSize": _pixel_rules,
    "rlnPixelSize": _pixel_rules,
}


def _judge(path, values, rules, name: str, where) -> None:
    """Raise the first refused value of ``values`` under ``rules``; log the warned ones.

    ``where(i)`` names row ``i`` (a particle or optics row) for the message.
    """
    for mask, verdict, reason in rules:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            continue
        rows = np.flatnonzero(mask)
        more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
        text = f"{path}: {name} {values[rows[0]]:g} {where(rows[0])}{more} {reason}"
        if verdict == "refuse":
            raise InputError(text)
        log.warning("%s", text)


def _check_values(path: Path, table: pd.DataFrame, optics, particle_columns) -> None:
    """Refuse impossible CTF and pixel-size values, warn about unusual ones, by row.

    Values are judged where the file holds them: particle-level columns by particle row,
    optics-level ones by optics row (one fix there fixes every particle of the group).
    """
    phase = table["rlnPhaseShift"].to_numpy() if "rlnPhaseShift" in table.columns else None
    groups = optics["rlnOpticsGroup"].to_numpy() if optics is not None else None

    def particle_row(i):
        return f"at particle row {i + 1}"

    def optics_row(i):
        return f"at data_optics row {i + 1} (optics group {groups[i]})"

    for column, rules in _VALUE_RULES.items():
        if column in particle_columns and column in table.columns:
            values, where = table[column].to_numpy(dtype=np.float64), particle_row
            near_focus = phase != 0 if phase is not None else np.zeros(len(values), bool)
        elif optics is not None and column in optics.columns:
            values, where = optics[column].to_numpy(dtype=np.float64), optics_row
            near_focus = np.zeros(len(values), bool)
        else:
            continue
        if rules is _defocus_rules:
            _judge(path, values, rules(values, near_focus), column, where)
        else:
            _judge(path, values, rules(values), column, where)


def _refuse_duplicate_images(path: Path, stacks: np.ndarray, index: np.ndarray) -> None:
    """The same image named by two rows (a bad merge, a set joined to itself) would count twice
    in training, or sit both in training and in the held-out set, voiding the held-out test."""
    keys = pd.Series(stacks).map(os.path.normpath) + "#" + pd.Series(index).astype(str)
    repeated = keys.duplicated().to_numpy()
    if not repeated.any():
        return
    second = int(np.flatnonzero(repeated)[0])
    first = int(np.flatnonzero((keys == keys.iloc[second]).to_numpy())[0])
    raise InputError(
        f"{path}: particle rows {first + 1} and {second + 1} name the same image "
        f"({index[second] + 1}@{Path(stacks[second]).name}), the first of "
        f"{int(repeated.sum())} repeated rows among {len(keys)} (a bad merge?); keep each image "
        "once"
    )


def _merge_optics(path: Path, particles: pd.DataFrame, optics: pd.DataFrame) -> pd.DataFrame:
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(f"{path}: data_optics has no rlnOpticsGroup column")
    if optics["rlnOpticsGroup"].duplicated().any():
        raise InputError(f"{path}: data_optics lists an optics group twice")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError(
                f"{path}: particles have no rlnOpticsGroup but data_optics has {len(optics)} groups"
            )
        particles = particles.assign(rlnOpticsGroup=int(optics["rlnOpticsGroup"].iloc[0]))
    groups = pd.to_numeric(particles["rlnOpticsGroup"], errors="coerce")
    known = set(pd.to_numeric(optics["rlnOpticsGroup"]).astype(int))
    unknown = ~groups.isin(known)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise InputError(
            f"{path}: particle row {row + 1} names optics group "
            f"{groups.iloc[row]:g}, which data_optics does not define "
            f"(known: {sorted(known)})"
        )
    optics = optics.assign(rlnOpticsGroup=pd.to_numeric(optics["rlnOpticsGroup"]).astype(int))
    particles = particles.assign(rlnOpticsGroup=groups.astype(int))
    # Particle-level values win over optics-level ones (RELION allows either place).
    extra = [c for c in optics.columns if c not in particles.columns or c == "rlnOpticsGroup"]
    merged = particles.merge(optics[extra], on="rlnOpticsGroup", how="left", sort=False)
    merged.index = particles.index
    return merged


def _pixel_size(path: Path, table: pd.DataFrame, optics, override) -> tuple[float, str]:
    """The pixel size in A and where it was found (for messages)."""
    found = None
    if optics is not None and "rlnImagePixelSize" in optics.columns:
        values = pd.to_numeric(optics["rlnImagePixelSize"], errors="coerce").to_numpy()
        if np.isfinite(values).all() and (values > 0).all():
            if np.ptp(values) > 0.02 * values.max():
                raise InputError(
                    f"{path}: optics groups have pixel sizes {sorted(set(values.tolist()))} A, "
                    "more than 2% apart; cryoday reconstructs one pixel size at a time "
                    "(split the set by optics group, or rescale the particles first)"
                )
            if np.ptp(values) > 0:
                log.warning("%s: optics groups have pixel sizes %s A; using their median",
                            path, sorted(set(values.tolist())))
            found = float(np.median(values)), "rlnImagePixelSize of data_optics"
    if found is None:
        for column in ("rlnImagePixelSize", "rlnPixelSize"):
            if column in table.columns:
                values = pd.to_numeric(table[column], errors="coerce").to_numpy()
                if np.isfinite(values).all() and (values > 0).all():
                    found = float(np.median(values)), f"{column} of the particles"
                    break
    if found is None and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        det = pd.to_numeric(table["rlnDetectorPixelSize"], errors="coerce").to_numpy()
        mag = pd.to_numeric(table["rlnMagnification"], errors="coerce").to_numpy()
        if np.isfinite(det).all() and np.isfinite(mag).all() and (mag > 0).all():
            found = (float(np.median(det * 1e4 / mag)),
                     "rlnDetectorPixelSize (um) / rlnMagnification")
    if found is not None:
        if override and abs(override - found[0]) > 0.01 * found[0]:
            log.warning("%s: the file says %.4f A/px, the config %.4f A/px; using the file's",
                        path, found[0], override)
        return found
    if override:
        return float(override), "the pixel size given in the config or on the command line"
    return float("nan"), ""


def _resolve_images(path: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Each row's stack path (relative ones from the STAR file's folder) and 0-based index in
    it, from ``rlnImageName`` (``N@stack``, or a single image's file): vectorised, and each
    distinct stack's path resolved once (a set has many rows per stack)."""
    base = path.parent
    text = names.astype(str).reset_index(drop=True)
    has_at = text.str.contains("@", regex=False).to_numpy()
    parts = text.str.partition("@")
    number = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(number) | (number != np.round(number))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: rlnImageName {text[row]!r} at particle row {row + 1} is not "
                         "N@stack")
    if (number < 1).any():
        row = int(np.flatnonzero(number < 1)[0])
        raise InputError(f"{path}: rlnImageName {text[row]!r} at particle row {row + 1}: images "
                         "count from 1")
    files = parts[2].where(has_at, text)
    empty = (files.str.strip() == "").to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise InputError(f"{path}: rlnImageName {text[row]!r} at particle row {row + 1} names no "
                         "stack file")
    unique, inverse = np.unique(files.to_numpy(dtype=str), return_inverse=True)
    resolved = np.array([str(Path(f) if Path(f).is_absolute() else base / f) for f in unique])
    return resolved[inverse].astype(str), number.astype(np.int64) - 1


def read_particles(star_path, pixel_size: float | None = None, require_ctf: bool = True,
                   check_stacks: bool = True) -> Particles:
    """Read a RELION particle STAR file (3.0 to 5) or a cryoSPARC ``.cs`` into :class:`Particles`.

    This is where a user's particle set is judged: besides the file's structure (a truncated
    or malformed row named by its line, missing columns, non-numeric values), values no
    microscope gives or that are in another unit (defocus in micrometres, voltage 0, amplitude
    contrast in percent, Cs in micrometres, pixel size in nm) are refused by column and row,
    unusual ones logged as warnings, and an image named by two rows is refused.

    Parameters
    ----------
    star_path : str or Path
        The STAR file; image names ``N@stack.mrcs`` are resolved relative to its folder.
    pixel_size : float, optional
        Pixel size in A, used only when the file has none (optics table, then particle table,
        then detector pixel size / magnification).
    require_ctf : bool
        Refuse files without the CTF columns the reconstruction needs.
    check_stacks : bool
        Open every stack's header to check it exists, its size agrees with its header, it
        holds each particle's index, and has square images of one size (sets ``box``; the
        pixel size may also come from it).

    Raises
    ------
    InputError
        With the file, column and particle row of the problem.
    """
    path = Path(star_path)
    if path.suffix.lower() == ".cs":
        # cryoSPARC's numpy table; imported here because cryoday.cryosparc builds on this module.
        from cryoday.cryosparc import read_cs

        return read_cs(path, pixel_size=pixel_size, require_ctf=require_ctf,
                       check_stacks=check_stacks)
    blocks = _read_star_blocks(path)
    block, particles = _particle_block(path, blocks)
    if len(particles) == 0:
        raise InputError(f"{path}: the particle table data_{block} is empty (no rows after its "
                         "column names)")
    particles = particles.reset_index(drop=True).copy()
    particle_columns = list(particles.columns)
    _check_numeric(path, particles, block)
    optics = blocks.get("optics")
    if optics is None:
        # Files written by other tools may name the optics block differently.
        optics = next((b for b in blocks.values() if "rlnOpticsGroup" in b.columns
                       and "rlnImageName" not in b.columns), None)
    if optics is not None and len(optics) == 0:
        optics = None
    if optics is not None:
        optics = optics.copy()
        _check_numeric(path, optics, "optics")
        particles = _merge_optics(path, particles, optics)
    if require_ctf:
        missing = [c for c in CTF_COLUMNS if c not in particles.columns]
        if missing:
            raise InputError(
                f"{path}: missing CTF column(s) {', '.join(missing)} (needed for reconstruction)"
            )
    _check_values(path, particles, optics, particle_columns)
    psize, psize_source = _pixel_size(path, particles, optics, pixel_size)
    stacks, index = _resolve_images(path, particles["rlnImageName"])
    _refuse_duplicate_images(path, stacks, index)
    result = Particles(particles, optics, path, psize, None, stacks, index, particle_columns)
    if check_stacks:
        header_file = _check_stacks(result)
        if header_file is not None:
            psize_source = f"the voxel size in {header_file}'s header"
    if not np.isfinite(result.pixel_size):
        raise InputError(
            f"{path}: pixel size found nowhere (no rlnImagePixelSize in the optics or particle "
            "table, no detector pixel size and magnification, no voxel size in the stack "
            "header); set pixel_size for this dataset in the config"
        )
    if not psize_source.startswith(("rlnImagePixelSize", "rlnPixelSize")):
        # Values from the tables were judged by row above.
        value = np.array([result.pixel_size])
        _judge(path, value, _pixel_rules(value), "pixel size",
               lambda i: f"A/px (from {psize_source})")
    return result


# Bytes per value of the MRC modes a particle stack or map may use (2014 MRC standard).
MRC_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}
MRC_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 3: "complex int16", 4: "complex64",
                  6: "uint16", 12: "float16"}


def mrc_header(file, what: str = "MRC file"):
    """The header of an MRC file, refused unless its file size is what the header says.

    mrcfile accepts a file larger than its header describes (with a warning) and calls a
    shorter one's header bad; a header whose mode byte disagrees with the data would make the
    data read as garbage. Returns ``(nx, ny, nz, mode, ispg, voxel_size)``.
    """
    path = Path(file)
    if path.is_dir():
        raise InputError(f"{file}: {what} is a directory, not an MRC file")
    if not path.is_file():
        raise InputError(f"{file}: {what} not found")
    size = path.stat().st_size
    if size < 1024:
        raise InputError(f"{file}: {what} of {size} bytes, shorter than an MRC header (1024 "
                         "bytes): empty or truncated")
    try:
        # mrcfile's warnings (no MAP id, odd machine stamp) are harmless for what follows: a
        # header misread for them would not match the file's size below.
        with warnings.catch_warnings(), mrcfile.open(file, header_only=True,
                                                     permissive=True) as mrc:
            warnings.simplefilter("ignore")
            header = mrc.header
            nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
            mode, ispg, extended = int(header.mode), int(header.ispg), int(header.nsymbt)
            voxel = float(mrc.voxel_size.x)
    except ValueError as exc:
        raise InputError(f"{file}: not a readable {what} ({exc})") from exc
    if mode not in MRC_MODE_BYTES:
        raise InputError(f"{file}: MRC mode {mode} is not one cryoday reads (modes "
                         f"{', '.join(map(str, MRC_MODE_BYTES))}); bad header?")
    if min(nx, ny, nz) <= 0 or extended < 0:
        raise InputError(f"{file}: header says {nx} x {ny} x {nz} values; bad header?")
    values = nx * ny * nz
    expected = 1024 + extended + values * MRC_MODE_BYTES[mode]
    if size != expected:
        data = size - 1024 - extended
        fits = [m for m, b in MRC_MODE_BYTES.items() if m != mode and b * values == data]
        shape = f"{nz} x {ny} x {nx} {MRC_MODE_NAMES[mode]} values (mode {mode})"
        if fits:
            raise InputError(
                f"{file}: header says {shape}, {expected:,} bytes, but the file has {size:,} "
                f"bytes, which fits mode {fits[0]} ({MRC_MODE_NAMES[fits[0]]}): the header's "
                "mode byte disagrees with the data; fix the header or write the file again")
        if size < expected:
            frame = nx * ny * MRC_MODE_BYTES[mode]
            whole = max(data, 0) // frame
            raise InputError(
                f"{file}: truncated: header says {shape}, {expected:,} bytes, but the file has "
                f"{size:,} bytes ({whole} of {nz} sections complete); copy it again")
        raise InputError(
            f"{file}: header says {shape}, {expected:,} bytes, but the file has {size:,} bytes "
            f"({size - expected:,} too many); bad header?")
    return nx, ny, nz, mode, ispg, voxel


def _stack_shape(file: str) -> tuple[tuple[int, int, int], float]:
    """(n, ny, nx) and the voxel size of an MRC stack, from its header only."""
    nx, ny, nz, mode, ispg, voxel = mrc_header(file, "particle stack")
    if mode in (3, 4):
        raise InputError(f"{file}: MRC mode {mode} holds complex values (Fourier transforms), "
                         "not particle images")
    if 401 <= ispg <= 630:
        raise InputError(f"{file}: holds a stack of 3D volumes (space group {ispg}, "
                         f"{nx} x {ny} x {nz}), not 2D particle images")
    return (nz, ny, nx), voxel


def _check_stacks(particles: Particles) -> str | None:
    """Check every stack; set ``box``, and the pixel size from a header when the STAR file has
    none (returning that stack's name)."""
    box = None
    header_psize, header_file = None, None
    for file in np.unique(particles.stack_paths):
        (n, ny, nx), voxel = _stack_shape(file)
        if ny != nx:
            raise InputError(f"{file}: images are {nx} x {ny}, not square")
        if box is not None and nx != box:
            raise InputError(f"{file}: images are {nx} px but other stacks have {box} px")
        box = nx
        if header_psize is None and voxel > 0:
            header_psize, header_file = voxel, file
        rows = np.flatnonzero(particles.stack_paths == file)
        too_far = rows[particles.stack_index[rows] >= n]
        if len(too_far):
            row = int(too_far[0])
            raise InputError(
                f"{particles.star_path}: particle row {row + 1} asks for image "
                f"{particles.stack_index[row] + 1} of {file}, which holds {n} images"
            )
    particles.box = box
    if not np.isfinite(particles.pixel_size) and header_psize:
        log.info("%s: pixel size %.4f A from the stack header", particles.star_path, header_psize)
        particles.pixel_size = header_psize
        return header_file
    return None


def ctf_params(particles: Particles) -> dict[str, np.ndarray]:
    """Per-particle CTF parameters named as :func:`cryoday.ctf.evaluate_ctf`'s arguments.

    Defocus in A, angle in degrees, voltage in kV, Cs in mm, B-factor in A^2, phase shift in
    degrees; missing optional columns take RELION's defaults.
    """
    t = particles.table
    missing = [c for c in CTF_COLUMNS if c not in t.columns]
    if missing:
        raise InputError(f"{particles.star_path}: missing CTF column(s) {', '.join(missing)}")

    def column(name, default):
        if name in t.columns:
            return t[name].to_numpy(dtype=np.float32)
        return np.full(len(t), default, dtype=np.float32)

    du = column("rlnDefocusU", 0.0)
    return {
        "defocus_u": du,
        "defocus_v": column("rlnDefocusV", np.nan) if "rlnDefocusV" in t else du.copy(),
        "defocus_angle": column("rlnDefocusAngle", 0.0),
        "voltage": column("rlnVoltage", 300.0),
        "cs": column("rlnSphericalAberration", 2.7),
        "amplitude_contrast": column("rlnAmplitudeContrast", 0.1),
        "bfactor": column("rlnCtfBfactor", 0.0),
        "phase_shift": column("rlnPhaseShift", 0.0),
    }


def poses(particles: Particles) -> dict[str, np.ndarray] | None:
    """Euler angles (degrees) and shifts (A, RELION origin convention), or None without angles."""
    t = particles.table
    if not {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(t.columns):
        return None
    out = {k: t[c].to_numpy(dtype=np.float64)
           for k, c in (("rot", "rlnAngleRot"), ("tilt", "rlnAngleTilt"), ("psi", "rlnAnglePsi"))}
    for axis in "XY":
        if f"rlnOrigin{axis}Angst" in t.columns:
            shift = t[f"rlnOrigin{axis}Angst"].to_numpy(dtype=np.float64)
        elif f"rlnOrigin{axis}" in t.columns:
            shift = t[f"rlnOrigin{axis}"].to_numpy(dtype=np.float64) * particles.pixel_size
        else:
            shift = np.zeros(len(t))
        out[f"shift_{axis.lower()}"] = shift
    return out


def write_particles(path, table: pd.DataFrame, optics: pd.DataFrame | None = None) -> None:
    """Write a RELION 3.1 particle STAR file atomically (data_optics first when given)."""
    blocks = {"optics": optics, "particles": table} if optics is not None else {
        "particles": table}
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True)


# ----------------------------------------------------------------------------- MRC files


def read_map(path) -> tuple[np.ndarray, float | None]:
    """A map as float32 ``[z, y, x]`` and its voxel size in A (None when the header says 0)."""
    path = Path(path)
    _, _, _, mode, _, _ = mrc_header(path, "map")
    if mode in (3, 4):
        raise InputError(f"{path}: MRC mode {mode} holds complex values (a Fourier transform), "
                         "not a map")
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            if mrc.data is None:
                raise InputError(f"{path}: not a readable MRC map")
            volume = np.asarray(mrc.data, dtype=np.float32).copy()
            voxel = float(mrc.voxel_size.x)
    except ValueError as exc:
        raise InputError(f"{path}: not a readable MRC map ({exc})") from exc
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"{path}: map of shape {volume.shape} is not a cube")
    finite = np.isfinite(volume)
    if not finite.all():
        raise InputError(f"{path}: map has {int((~finite).sum()):,} NaN or infinite values of "
                         f"{volume.size:,}")
    return volume, (voxel if voxel > 0 else None)


def check_reference(path, box: int, pixel_size: float) -> str:
    """Refuse, before any reconstruction, a reference map that validation could not compare.

    A reference in another box or at another voxel size is resampled at validation, which needs
    its voxel size; one without a voxel size must match the particles' box. Returns a sentence for
    the log.
    """
    volume, voxel = read_map(path)
    n = volume.shape[0]
    if voxel is None:
        if n != box:
            raise InputError(
                f"{path}: reference map is {n} px with no voxel size in its header, the "
                f"particles {box} px at {pixel_size:.4f} A/px; set its voxel size (e.g. "
                "relion_image_handler --angpix, or mrcfile) so it can be resampled")
        return f"{path}: reference {n} px, voxel size taken as the particles' {pixel_size:.4f} A"
    if n * voxel < 0.5 * box * pixel_size:
        raise InputError(
            f"{path}: reference map spans {n * voxel:.0f} A ({n} px at {voxel:.4f} A), less than "
            f"half the particles' {box * pixel_size:.0f} A box; is its voxel size right?")
    return (f"{path}: reference {n} px at {voxel:.4f} A/px, resampled to {box} px at "
            f"{pixel_size:.4f} A/px for validation")


def write_map(path, volume: np.ndarray, voxel_size: float) -> None:
    """Write a float32 map with its voxel size in the header, atomically."""
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.voxel_size = voxel_size
            mrc.update_header_stats()


def open_stack(path) -> np.ndarray:
    """A read-only memory map of a whole ``(n, box, box)`` stack (one we wrote)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: stack not found")
    mrc = mrcfile.mmap(path, mode="r", permissive=True)
    data = mrc.data
    return data if data.ndim == 3 else data[np.newaxis]


class _StackRows:
    """Write access to a stack's images by row (``rows[a:b] = images``), through the file.

    Plain file writes, not a memory map: written pages belong to the page cache, not to the
    process, so filling a 100,000-image stack keeps the writer's memory at one chunk.
    """

    def __init__(self, file, n: int, box: int, offset: int, path=None):
        self._file, self._offset, self._path = file, offset, path
        self.shape = (n, box, box)

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, key, images) -> None:
        n, box, _ = self.shape
        if isinstance(key, (int, np.integer)):
            key = int(key) + (n if key < 0 else 0)
            key = slice(key, key + 1)
        if not isinstance(key, slice):
            raise TypeError("stack rows are written by index or contiguous slice")
        start, stop, step = key.indices(n)
        if step != 1:
            raise TypeError("stack rows are written by contiguous slice")
        block = np.broadcast_to(np.asarray(images, dtype="<f4"), (stop - start, box, box))
        try:
            self._file.seek(self._offset + start * box * box * 4)
            self._file.write(np.ascontiguousarray(block).tobytes())
        except OSError as exc:  # a full disk shows here, not at the sparse file's creation
            raise write_error(self._path or self._file.name, exc) from exc


class StackWriter:
    """Create a ``.mrcs`` stack to fill in chunks; renamed into place on success.

    >>> with StackWriter("out.mrcs", n, box, 1.2) as w:   # doctest: +SKIP
    ...     w.data[0:100] = images
    """

    def __init__(self, path, n: int, box: int, pixel_size: float):
        self.path = Path(path)
        self.tmp = temporary_beside(self.path, ".tmp")
        self.n, self.box = int(n), int(box)
        try:
            with mrcfile.new_mmap(self.tmp, shape=(n, box, box), mrc_mode=2,
                                  overwrite=True) as mrc:
                mrc.set_image_stack()
                mrc.voxel_size = pixel_size
            self._offset = self.tmp.stat().st_size - self.n * self.box * self.box * 4
            self._file = open(self.tmp, "r+b")
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise write_error(self.path, exc) from exc
        self.data = _StackRows(self._file, self.n, self.box, self._offset, self.path)

    def __enter__(self) -> StackWriter:
        return self

    def _header_stats(self, chunk: int = 1000) -> tuple[float, float, float, float]:
        """min, max, mean, rms of the written images, read back a chunk at a time."""
        lo, hi, total, total2 = np.inf, -np.inf, 0.0, 0.0
        frame = self.box * self.box
        for start in range(0, self.n, chunk):
            count = min(chunk, self.n - start) * frame
            values = np.fromfile(self.tmp, dtype="<f4", count=count,
                                 offset=self._offset + start * frame * 4).astype(np.float64)
            lo, hi = min(lo, values.min()), max(hi, values.max())
            total += values.sum()
            total2 += (values * values).sum()
        size = float(self.n * frame)
        mean = total / size
        return lo, hi, mean, float(np.sqrt(max(total2 / size - mean * mean, 0.0)))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._file.close()  # flushes the last writes: a full disk may show only here
            if exc_type is not None:
                return
            lo, hi, mean, rms = self._header_stats()
            with mrcfile.mmap(self.tmp, mode="r+", permissive=True) as mrc:
                mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
                mrc.header.rms = rms
            os.replace(self.tmp, self.path)
        except OSError as error:
            self.tmp.unlink(missing_ok=True)
            if exc_type is not None:
                return  # the body's own error says more
            raise write_error(self.path, error) from error
        finally:
            if exc_type is not None:
                self.tmp.unlink(missing_ok=True)


def _drop_mapped_pages(array: np.ndarray) -> None:
    """Let go of the pages of a read-only memory-mapped stack that a read touched.

    They stay in the page cache, but no longer count in the process's resident memory, which
    would otherwise grow to the whole stack as a pass reads it (and a scheduler counts it).
    """
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


# Bytes of a stack read_rows reads before letting go of the mapped pages it touched.
READ_CHUNK_BYTES = 64 << 20


def read_rows(stack: np.ndarray, rows) -> np.ndarray:
    """``stack[rows]`` as float32, a copy, from a memory map without keeping its pages.

    Read ``READ_CHUNK_BYTES`` at a time into the one output array: ``np.array(stack[rows])``
    of a whole stage's images (a stage keeps them in memory when they fit) held the mapped
    pages, the fancy-indexed copy and its float32 copy at once, three times the images (a
    200,000-particle 20 A stage peaked at 2.6 GB for 0.8 GB of images).
    """
    if isinstance(rows, slice):
        rows = np.arange(len(stack))[rows]
    rows = np.asarray(rows)
    out = np.empty((len(rows),) + tuple(stack.shape[1:]), dtype=np.float32)
    per_row = max(1, int(np.prod(stack.shape[1:])) * stack.dtype.itemsize)
    step = max(1, READ_CHUNK_BYTES // per_row)
    for lo in range(0, len(rows), step):
        out[lo:lo + step] = stack[rows[lo:lo + step]]
        _drop_mapped_pages(stack)
    return out


class ImageSource:
    """Memory-mapped access to the images of a :class:`Particles`, never loading stacks whole."""

    def __init__(self, particles: Particles):
        self.particles = particles
        self._handles: dict[str, mrcfile.mrcmemmap.MrcMemmap] = {}
        if particles.box is None:
            _check_stacks(particles)
        self.box = particles.box

    def __len__(self) -> int:
        return len(self.particles)

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _stack(self, file: str) -> np.ndarray:
        if file not in self._handles:
            self._handles[file] = mrcfile.mmap(file, mode="r", permissive=True)
        data = self._handles[file].data
        return data if data.ndim == 3 else data[np.newaxis]

    def read(self, rows) -> np.ndarray:
        """Images of the given particle rows as a float32 ``(n, box, box)`` array (a copy)."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), self.box, self.box), dtype=np.float32)
        files = self.particles.stack_paths[rows]
        for file in np.unique(files):
            sel = np.flatnonzero(files == file)
            stack = self._stack(file)
            try:
                out[sel] = stack[self.particles.stack_index[rows[sel]]]
            except (ValueError, IndexError) as exc:
                raise InputError(f"{file}: cannot read images ({exc}); is it truncated?") from exc
            _drop_mapped_pages(stack)
        bad = ~np.isfinite(out).all(axis=(1, 2))
        if bad.any():
            row = int(rows[np.flatnonzero(bad)[0]])
            raise InputError(
                f"{self.particles.stack_paths[row]}: image {self.particles.stack_index[row] + 1} "
                f"(particle row {row + 1}) has NaN or infinite pixels"
            )
        return out
