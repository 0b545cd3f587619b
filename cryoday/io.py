"""Reading and writing the files users bring and get: RELION STAR files, MRC maps and stacks.

All file I/O of cryoday lives here. STAR files are parsed by ``starfile`` and MRC files by
``mrcfile``; this module adds RELION's semantics (optics groups, ``N@stack`` image names, pixel
size lookup, old and new origin columns), validation with messages that name the file, column and
particle, memory-mapped image access, and atomic writes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from cryoday.errors import InputError

log = logging.getLogger(__name__)

CTF_COLUMNS = ("rlnDefocusU", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
NUMERIC_COLUMNS = (
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
    "rlnAmplitudeContrast", "rlnCtfBfactor", "rlnPhaseShift", "rlnImagePixelSize",
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
    "rlnOriginX", "rlnOriginY", "rlnOpticsGroup",
)


# ----------------------------------------------------------------------------- atomic writes


def temporary_beside(path: Path, suffix: str) -> Path:
    """A new empty file next to ``path``, with the permissions a plain new file would get.

    ``mkstemp`` makes files only their owner can read; results renamed from them into place
    must be readable as the user's umask allows (a facility's group, a cluster's other nodes).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it into place only on clean exit.

    A killed or failing writer therefore never leaves a half-written ``path`` behind.
    """
    path = Path(path)
    tmp = temporary_beside(path, ".tmp" + path.suffix)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
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
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found")
    try:
        data = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises a variety of parser errors
        raise InputError(f"{path}: not a readable STAR file ({exc})") from exc
    blocks = {name: df for name, df in data.items() if isinstance(df, pd.DataFrame)}
    _refuse_duplicate_blocks(path)
    return blocks


def _refuse_duplicate_blocks(path: Path) -> None:
    """A block named twice (two files concatenated, a bad merge) would be silently dropped."""
    seen = set()
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("data_"):
                name = line.split()[0]
                if name in seen:
                    raise InputError(f"{path}: block {name} appears twice (again on line "
                                     f"{number}); merge the tables or keep one")
                seen.add(name)


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
    for column in NUMERIC_COLUMNS:
        if column not in table.columns:
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() & table[column].notna()
        bad |= values.isna() & table[column].isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(
                f"{path}: column {column} of data_{block} has a non-numeric value "
                f"{table[column].iloc[row]!r} at particle row {row + 1}"
            )
        table[column] = values


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
            f"{particles['rlnOpticsGroup'].iloc[row]!r}, which data_optics does not define "
            f"(known: {sorted(known)})"
        )
    optics = optics.assign(rlnOpticsGroup=pd.to_numeric(optics["rlnOpticsGroup"]).astype(int))
    particles = particles.assign(rlnOpticsGroup=groups.astype(int))
    # Particle-level values win over optics-level ones (RELION allows either place).
    extra = [c for c in optics.columns if c not in particles.columns or c == "rlnOpticsGroup"]
    merged = particles.merge(optics[extra], on="rlnOpticsGroup", how="left", sort=False)
    merged.index = particles.index
    return merged


def _pixel_size(path: Path, table: pd.DataFrame, optics, override) -> float:
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
            found = float(np.median(values))
    if found is None:
        for column in ("rlnImagePixelSize", "rlnPixelSize"):
            if column in table.columns:
                values = pd.to_numeric(table[column], errors="coerce").to_numpy()
                if np.isfinite(values).all() and (values > 0).all():
                    found = float(np.median(values))
                    break
    if found is None and {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        det = pd.to_numeric(table["rlnDetectorPixelSize"], errors="coerce").to_numpy()
        mag = pd.to_numeric(table["rlnMagnification"], errors="coerce").to_numpy()
        if np.isfinite(det).all() and np.isfinite(mag).all() and (mag > 0).all():
            found = float(np.median(det * 1e4 / mag))
    if found is not None:
        if override and abs(override - found) > 0.01 * found:
            log.warning("%s: the file says %.4f A/px, the config %.4f A/px; using the file's",
                        path, found, override)
        return found
    if override:
        return float(override)
    return float("nan")


def _resolve_images(path: Path, names: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    base = path.parent
    stacks = np.empty(len(names), dtype=object)
    index = np.empty(len(names), dtype=np.int64)
    for row, name in enumerate(names.astype(str)):
        if "@" in name:
            number, _, file = name.partition("@")
            try:
                index[row] = int(number) - 1
            except ValueError:
                raise InputError(
                    f"{path}: rlnImageName {name!r} at particle row {row + 1} is not N@stack"
                ) from None
            if index[row] < 0:
                raise InputError(
                    f"{path}: rlnImageName {name!r} at particle row {row + 1}: images count from 1"
                )
        else:
            file, index[row] = name, 0
        stacks[row] = str(Path(file) if Path(file).is_absolute() else base / file)
    return stacks.astype(str), index


def read_particles(star_path, pixel_size: float | None = None, require_ctf: bool = True,
                   check_stacks: bool = True) -> Particles:
    """Read a RELION particle STAR file (3.0 to 5) into a :class:`Particles`.

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
        Open every stack's header to check it exists, holds each particle's index, and has
        square images of one size (sets ``box``; the pixel size may also come from it).

    Raises
    ------
    InputError
        With the file, column and particle row of the problem.
    """
    path = Path(star_path)
    blocks = _read_star_blocks(path)
    block, particles = _particle_block(path, blocks)
    if len(particles) == 0:
        raise InputError(f"{path}: the particle table data_{block} is empty")
    particles = particles.reset_index(drop=True).copy()
    particle_columns = list(particles.columns)
    optics = blocks.get("optics")
    if optics is None:
        # Files written by other tools may name the optics block differently.
        optics = next((b for b in blocks.values() if "rlnOpticsGroup" in b.columns
                       and "rlnImageName" not in b.columns), None)
    if optics is not None and len(optics) == 0:
        optics = None
    if optics is not None:
        optics = optics.copy()
        particles = _merge_optics(path, particles, optics)
    _check_numeric(path, particles, block)
    if require_ctf:
        missing = [c for c in CTF_COLUMNS if c not in particles.columns]
        if missing:
            raise InputError(
                f"{path}: missing CTF column(s) {', '.join(missing)} (needed for reconstruction)"
            )
    psize = _pixel_size(path, particles, optics, pixel_size)
    stacks, index = _resolve_images(path, particles["rlnImageName"])
    result = Particles(particles, optics, path, psize, None, stacks, index, particle_columns)
    if check_stacks:
        _check_stacks(result)
    if not np.isfinite(result.pixel_size):
        raise InputError(
            f"{path}: pixel size found nowhere (no rlnImagePixelSize in the optics or particle "
            "table, no detector pixel size and magnification, no voxel size in the stack "
            "header); set pixel_size for this dataset in the config"
        )
    return result


def _stack_shape(file: str) -> tuple[tuple[int, int, int], float]:
    """(n, ny, nx) and the voxel size of an MRC stack, from its header only."""
    if not Path(file).is_file():
        raise InputError(f"{file}: particle stack not found")
    try:
        with mrcfile.mmap(file, mode="r", permissive=True) as mrc:
            if mrc.data is None:
                raise InputError(f"{file}: not a readable MRC file (bad header)")
            shape = mrc.data.shape
            voxel = float(mrc.voxel_size.x)
            mode, complex_values = int(mrc.header.mode), mrc.data.dtype.kind == "c"
    except ValueError as exc:
        raise InputError(f"{file}: not a readable MRC stack ({exc})") from exc
    if complex_values:
        raise InputError(f"{file}: MRC mode {mode} holds complex values (Fourier transforms), "
                         "not particle images")
    if len(shape) == 2:
        shape = (1,) + shape
    return shape, voxel


def _check_stacks(particles: Particles) -> None:
    box = None
    header_psize = None
    for file in np.unique(particles.stack_paths):
        (n, ny, nx), voxel = _stack_shape(file)
        if ny != nx:
            raise InputError(f"{file}: images are {nx} x {ny}, not square")
        if box is not None and nx != box:
            raise InputError(f"{file}: images are {nx} px but other stacks have {box} px")
        box = nx
        header_psize = header_psize or (voxel if voxel > 0 else None)
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
    if not path.is_file():
        raise InputError(f"{path}: map not found")
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
    if not np.isfinite(volume).all():
        raise InputError(f"{path}: map has NaN or infinite values")
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

    def __init__(self, file, n: int, box: int, offset: int):
        self._file, self._offset = file, offset
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
        self._file.seek(self._offset + start * box * box * 4)
        self._file.write(np.ascontiguousarray(block).tobytes())


class StackWriter:
    """Create a ``.mrcs`` stack to fill in chunks; renamed into place on success.

    >>> with StackWriter("out.mrcs", n, box, 1.2) as w:   # doctest: +SKIP
    ...     w.data[0:100] = images
    """

    def __init__(self, path, n: int, box: int, pixel_size: float):
        self.path = Path(path)
        self.tmp = temporary_beside(self.path, ".tmp")
        self.n, self.box = int(n), int(box)
        with mrcfile.new_mmap(self.tmp, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size
        self._offset = self.tmp.stat().st_size - self.n * self.box * self.box * 4
        self._file = open(self.tmp, "r+b")
        self.data = _StackRows(self._file, self.n, self.box, self._offset)

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
        self._file.close()
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        lo, hi, mean, rms = self._header_stats()
        with mrcfile.mmap(self.tmp, mode="r+", permissive=True) as mrc:
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
            mrc.header.rms = rms
        os.replace(self.tmp, self.path)


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


def read_rows(stack: np.ndarray, rows) -> np.ndarray:
    """``stack[rows]`` as float32, a copy, from a memory map without keeping its pages."""
    out = np.array(stack[rows], dtype=np.float32)
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
