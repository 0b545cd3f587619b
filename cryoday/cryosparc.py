"""cryoSPARC ``.cs`` particle files in and out, through the same table as a RELION STAR file.

A ``.cs`` file is a numpy structured array saved with ``numpy.save`` (one row per particle,
fields such as ``blob/path``, ``ctf/df1_A``, ``alignments3D/pose``). cryoSPARC writes a job's
own results in ``J24_particles.cs`` and everything the job passed through untouched (often the
CTF) in ``P12_J24_passthrough_particles.cs`` beside it; rows of the two are matched by ``uid``.

We read them with numpy directly rather than with ``cryosparc-tools``' ``Dataset``. The file
*is* an ``.npy`` file, so ``numpy.load`` reads it exactly (``Dataset.load`` itself calls it);
``cryosparc-tools`` 5.0 is a compiled wheel that also pulls in ``httpx`` and ``pydantic`` for its
client of a cryoSPARC server, and its release numbers follow the server's, none of which a
reader needs. The one format numpy cannot read is cryoSPARC's newer compressed ``CSDAT`` stream,
which we recognise and refuse with a clear message. Files we write are plain ``numpy.save``
output with cryoSPARC's field names and dtypes, which ``Dataset.load`` reads (checked in
development with ``cryosparc-tools`` 5.0.3).

Conventions (``docs/conventions.md``, section "cryoSPARC .cs files"):

- ``alignments3D/pose`` is an axis-angle (rotation) vector ``r``; RELION's matrix of the same
  view is the *transpose* of the rotation it encodes, ``A = R(r)^T`` (as pyem's ``csparc2star``
  and cryoDRGN's ``parse_pose_csparc`` convert).
- ``alignments3D/shift`` is in pixels of ``alignments3D/psize_A`` with RELION's sign:
  ``rlnOriginXAngst = shift_x * psize``.
- ``blob/idx`` counts from 0, ``rlnImageName`` from 1; ``alignments3D/class`` and
  ``ctf/exp_group_id`` from 0, ``rlnClassNumber`` and ``rlnOpticsGroup`` from 1.
- Angles are radians in a ``.cs`` file (``ctf/df_angle_rad``, ``ctf/phase_shift_rad``), degrees
  in the table.
"""

from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.transform import Rotation

from cryoday import io
from cryoday.errors import InputError
from cryoday.geometry import euler_to_matrix, matrix_to_euler

log = logging.getLogger(__name__)

#: Fields without which a particle cannot be reconstructed (the STAR reader's ``CTF_COLUMNS``).
CTF_FIELDS = ("ctf/df1_A", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
IMAGE_FIELDS = ("blob/path", "blob/idx")
#: Table columns of cryoday's own that carry what RELION has no label for; written back to .cs.
UID_COLUMN = "cryosparcUid"
SIGN_COLUMN = "cryosparcSign"

# cryoSPARC's field dtypes, as its own jobs write them (cryosparc-tools' 4k_dataset.cs and the
# real job outputs in ../shared/data): needed when a file we write gains a field it lacked.
ALIGNMENT_DTYPES = {
    "split": ("<u4", ()), "shift": ("<f4", (2,)), "pose": ("<f4", (3,)), "psize_A": ("<f4", ()),
    "error": ("<f4", ()), "error_min": ("<f4", ()), "resid_pow": ("<f4", ()),
    "slice_pow": ("<f4", ()), "image_pow": ("<f4", ()), "cross_cor": ("<f4", ()),
    "alpha": ("<f4", ()), "alpha_min": ("<f4", ()), "weight": ("<f4", ()),
    "pose_ess": ("<f4", ()), "shift_ess": ("<f4", ()), "class_posterior": ("<f4", ()),
    "class": ("<u4", ()), "class_ess": ("<f4", ()),
}
# Values a freshly made alignments3D slot gets for the fields cryoday does not estimate: those
# of a single-class result whose per-particle statistics are unknown.
_ALIGNMENT_FILL = {"alpha": 1.0, "alpha_min": 1.0, "class_posterior": 1.0, "class_ess": 1.0}

_CSDAT_MAGIC = b"\x95CSDAT"
_NUMPY_MAGIC = b"\x93NUMPY"


# ----------------------------------------------------------------------------- poses


def pose_to_matrix(pose: np.ndarray) -> np.ndarray:
    """RELION rotation matrices ``A`` of cryoSPARC axis-angle poses ``(n, 3)`` (radians).

    The vector encodes a rotation ``R`` (axis ``pose / |pose|``, angle ``|pose|``, right-handed);
    RELION's matrix of the same view is its transpose, ``A = R^T`` (``docs/conventions.md``).
    """
    pose = np.asarray(pose, dtype=np.float64).reshape(-1, 3)
    return np.swapaxes(Rotation.from_rotvec(pose).as_matrix(), -1, -2)


def matrix_to_pose(matrices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pose_to_matrix`: axis-angle vectors ``(n, 3)`` with angle in [0, pi]."""
    matrices = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    return Rotation.from_matrix(np.swapaxes(matrices, -1, -2)).as_rotvec()


# ----------------------------------------------------------------------------- reading


def load_cs(path) -> np.ndarray:
    """The structured array of a ``.cs`` file, refusing what is not one with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: cryoSPARC .cs file not found")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == _CSDAT_MAGIC:
        raise InputError(
            f"{path}: saved in cryoSPARC's compressed CSDAT format, which numpy cannot read; "
            "export it again in the default format (cryosparc-tools: "
            "Dataset.load(path).save(out))")
    if magic != _NUMPY_MAGIC:
        raise InputError(f"{path}: not a cryoSPARC .cs file (no numpy header)")
    # Files with hundreds of fields have headers longer than numpy's default 10 kB limit.
    kwargs = {"max_header_size": 2**30} if _numpy_has_max_header_size() else {}
    try:
        data = np.load(path, allow_pickle=False, **kwargs)
    except Exception as exc:  # numpy raises ValueError/EOFError/OSError variously
        raise InputError(f"{path}: not a readable cryoSPARC .cs file ({exc})") from exc
    if data.dtype.names is None or data.ndim != 1:
        raise InputError(f"{path}: a .cs file holds a table of fields; this holds a plain "
                         f"{data.dtype} array of shape {data.shape}")
    return data


def _numpy_has_max_header_size() -> bool:
    major, minor = (int(p) for p in np.__version__.split(".")[:2])
    return (major, minor) >= (1, 24)


def passthrough_patterns(cs_path) -> list[str]:
    """Glob patterns, best first, of where cryoSPARC puts the passthrough file of ``cs_path``.

    ``J24_particles.cs`` or ``cryosparc_P12_J24_001_particles.cs`` pairs with
    ``P12_J24_passthrough_particles.cs`` in the same folder; an exported
    ``P12_J24_particles_exported.cs`` needs none (the export merges it in).
    """
    cs_path = Path(cs_path)
    job = re.search(r"(?:^|_)(J\d+)_", cs_path.name)
    project = re.search(r"(?:^|_)(P\d+)_J\d+", cs_path.name)
    folder = cs_path.parent
    if not job:
        return [str(folder / "*passthrough*.cs")]
    patterns = [str(folder / f"{project.group(1)}_{job.group(1)}_passthrough_particles.cs")] \
        if project else []
    return patterns + [str(folder / f"*{job.group(1)}_passthrough_particles*.cs")]


def passthrough_candidates(cs_path) -> list[Path]:
    """Existing files matching :func:`passthrough_patterns`, best first."""
    found = []
    for pattern in passthrough_patterns(cs_path):
        for p in sorted(Path(pattern).parent.glob(Path(pattern).name)):
            if p not in found and p != Path(cs_path):
                found.append(p)
    return found


def _merge_passthrough(path: Path, data: np.ndarray, passthrough: Path) -> np.ndarray:
    """``data`` with the fields only ``passthrough`` has, its rows matched by ``uid``."""
    extra = load_cs(passthrough)
    new = [n for n in extra.dtype.names if n not in data.dtype.names]
    if not new:
        return data
    for file, array in ((path, data), (passthrough, extra)):
        if "uid" not in array.dtype.names:
            raise InputError(f"{file}: no uid field, so its rows cannot be matched with "
                             f"{passthrough if file == path else path}")
    order = np.argsort(extra["uid"], kind="stable")
    sorted_uid = extra["uid"][order]
    at = np.minimum(np.searchsorted(sorted_uid, data["uid"]), len(sorted_uid) - 1)
    found = sorted_uid[at] == data["uid"] if len(sorted_uid) else np.zeros(len(data), bool)
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise InputError(
            f"{passthrough}: has no row for {int((~found).sum())} particle(s) of {path} "
            f"(first: row {row + 1}, uid {int(data['uid'][row])}); is it the passthrough of "
            "another job?")
    rows = order[at]
    merged = np.empty(len(data), dtype=_dtype_with(data.dtype, [(n, extra.dtype[n]) for n in new]))
    for name in data.dtype.names:
        merged[name] = data[name]
    for name in new:
        merged[name] = extra[name][rows]
    log.info("%s: %d field(s) from %s", path, len(new), passthrough)
    return merged


def _dtype_with(dtype: np.dtype, fields) -> np.dtype:
    descr = [(n, dtype.fields[n][0]) for n in dtype.names]
    return np.dtype(descr + list(fields))


def _decode(values: np.ndarray) -> np.ndarray:
    """Byte strings of a ``.cs`` field as ``str``, without cryoSPARC's ``>`` import marker."""
    values = np.asarray(values)
    text = np.char.decode(values, "utf-8") if values.dtype.kind == "S" else values.astype(str)
    # Exported .cs files mark paths inside the project's imported/ folders with a leading ">".
    return np.where(np.char.startswith(text, ">"), np.char.lstrip(text, ">"), text)


def _check_fields(path: Path, data: np.ndarray, require_ctf: bool, looked: list[Path],
                  explicit: bool) -> None:
    names = set(data.dtype.names)
    missing = [f for f in IMAGE_FIELDS if f not in names]
    if missing:
        raise InputError(f"{path}: missing field(s) {', '.join(missing)} (the particle images); "
                         "is this a particle .cs file?")
    missing = [f for f in CTF_FIELDS if f not in names]
    if require_ctf and missing:
        where = ("in it or its passthrough " + ", ".join(map(str, looked)) if explicit or looked
                 else "and no passthrough file beside it (looked for "
                 + ", ".join(passthrough_patterns(path)) + ")")
        raise InputError(f"{path}: missing CTF field(s) {', '.join(missing)} {where}; "
                         "pass the job's passthrough .cs (needed for reconstruction)")


def _check_values(path: Path, data: np.ndarray) -> None:
    """Refuse non-finite numbers and values in the wrong unit, naming the field and row."""
    for name in ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm",
                 "ctf/amp_contrast", "ctf/phase_shift_rad", "ctf/bfactor", "blob/psize_A",
                 "alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A"):
        if name not in data.dtype.names:
            continue
        values = np.asarray(data[name], dtype=np.float64).reshape(len(data), -1)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{path}: field {name} has a non-finite value at particle row "
                             f"{row + 1}")
    for name in ("ctf/df_angle_rad", "ctf/phase_shift_rad"):
        if name in data.dtype.names:
            values = np.abs(data[name].astype(np.float64))
            if (values > 2 * np.pi + 1e-3).any():
                row = int(np.argmax(values))
                raise InputError(
                    f"{path}: field {name} is {data[name][row]:g} at particle row {row + 1}, "
                    "beyond 2 pi: degrees where cryoSPARC stores radians?")
    for name in ("blob/psize_A", "alignments3D/psize_A"):
        if name in data.dtype.names:
            values = data[name].astype(np.float64)
            if (values <= 0).any():
                row = int(np.flatnonzero(values <= 0)[0])
                raise InputError(f"{path}: field {name} is {values[row]:g} A at particle row "
                                 f"{row + 1}; a pixel size must be positive")
    if "ctf/accel_kv" in data.dtype.names and (data["ctf/accel_kv"] > 1000).any():
        row = int(np.argmax(data["ctf/accel_kv"]))
        raise InputError(f"{path}: field ctf/accel_kv is {data['ctf/accel_kv'][row]:g} at "
                         f"particle row {row + 1}: volts where cryoSPARC stores kV?")


def cs_to_table(data: np.ndarray, path="<array>") -> pd.DataFrame:
    """The RELION-labelled particle table of a (merged) ``.cs`` array, one row per particle.

    Parameters
    ----------
    data : numpy.ndarray
        Structured array with cryoSPARC's fields.
    path : str or Path
        Named in messages.

    Returns
    -------
    pandas.DataFrame
        ``rlnImageName`` (``N@path``, N from 1), CTF columns in RELION's units (A, degrees, kV,
        mm), ``rlnImagePixelSize``, ``rlnImageSize``, ``rlnOpticsGroup`` (from 1), and when
        the file has 3D alignments ``rlnAngleRot/Tilt/Psi`` (degrees), ``rlnOriginX/YAngst``
        (A), ``rlnClassNumber`` (from 1), ``rlnRandomSubset``; plus ``cryosparcUid`` and
        ``cryosparcSign`` (``blob/sign``) for writing the set back.
    """
    names = set(data.dtype.names)
    n = len(data)
    table = {}
    index = data["blob/idx"].astype(np.int64)
    stacks = _decode(data["blob/path"])
    table["rlnImageName"] = pd.Series(index + 1).map("{:06d}".format).to_numpy(object) + "@" \
        + stacks.astype(object)
    if "location/micrograph_path" in names:
        table["rlnMicrographName"] = _decode(data["location/micrograph_path"])

    def f64(name):
        return data[name].astype(np.float64)

    if "ctf/df1_A" in names:
        table["rlnDefocusU"] = f64("ctf/df1_A")
        table["rlnDefocusV"] = f64("ctf/df2_A") if "ctf/df2_A" in names else f64("ctf/df1_A")
        table["rlnDefocusAngle"] = (np.rad2deg(f64("ctf/df_angle_rad"))
                                    if "ctf/df_angle_rad" in names else np.zeros(n))
    for field, column in (("ctf/accel_kv", "rlnVoltage"), ("ctf/cs_mm", "rlnSphericalAberration"),
                          ("ctf/amp_contrast", "rlnAmplitudeContrast"),
                          ("ctf/bfactor", "rlnCtfBfactor")):
        if field in names:
            table[column] = f64(field)
    if "ctf/phase_shift_rad" in names:
        table["rlnPhaseShift"] = np.rad2deg(f64("ctf/phase_shift_rad"))
    if "blob/psize_A" in names:
        table["rlnImagePixelSize"] = f64("blob/psize_A")
    if "blob/shape" in names:
        table["rlnImageSize"] = np.asarray(data["blob/shape"]).reshape(n, -1)[:, -1].astype(int)
    table["rlnOpticsGroup"] = (data["ctf/exp_group_id"].astype(np.int64) + 1
                               if "ctf/exp_group_id" in names else np.ones(n, dtype=np.int64))
    if {"alignments3D/pose", "alignments3D/shift"} <= names:
        rot, tilt, psi = matrix_to_euler(pose_to_matrix(data["alignments3D/pose"]))
        table["rlnAngleRot"], table["rlnAngleTilt"], table["rlnAnglePsi"] = rot, tilt, psi
        psize_field = ("alignments3D/psize_A" if "alignments3D/psize_A" in names
                       else "blob/psize_A")
        if psize_field not in names:
            raise InputError(f"{path}: alignments3D/shift is in pixels but the file has no "
                             "alignments3D/psize_A or blob/psize_A")
        shift = np.asarray(data["alignments3D/shift"], dtype=np.float64).reshape(n, 2)
        table["rlnOriginXAngst"] = shift[:, 0] * f64(psize_field)
        table["rlnOriginYAngst"] = shift[:, 1] * f64(psize_field)
        if "alignments3D/class" in names:
            table["rlnClassNumber"] = data["alignments3D/class"].astype(np.int64) + 1
        if "alignments3D/split" in names:
            table["rlnRandomSubset"] = data["alignments3D/split"].astype(np.int64) + 1
    elif any(name.startswith(("alignments_class_", "alignments3D_multi/")) for name in names):
        log.warning("%s: poses only per class (heterogeneous refinement); read without poses",
                    path)
    if "uid" in names:
        table[UID_COLUMN] = data["uid"].astype(np.uint64)
    if "blob/sign" in names:
        table[SIGN_COLUMN] = f64("blob/sign")
    return pd.DataFrame(table)


# Columns that are one value per optics group when the file agrees (as RELION 3.1 stores them).
_OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                   "rlnImagePixelSize", "rlnImageSize")


def _optics_table(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A RELION 3.1 optics table and the columns that stay per particle."""
    groups = table.groupby("rlnOpticsGroup", sort=True)
    optics = pd.DataFrame({"rlnOpticsGroup": np.asarray(list(groups.groups), dtype=np.int64)})
    optics.insert(0, "rlnOpticsGroupName",
                  [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    per_particle = []
    for column in _OPTICS_COLUMNS:
        if column not in table:
            continue
        if (groups[column].nunique() > 1).any():
            per_particle.append(column)
        else:
            optics[column] = groups[column].first().to_numpy()
    particle_columns = [c for c in table.columns if c not in optics.columns or
                        c in per_particle or c == "rlnOpticsGroup"]
    return optics, particle_columns


def _stack_base(path: Path, stacks: np.ndarray, project_dir, check_stacks: bool) -> Path:
    """The folder ``blob/path`` is relative to: the project folder (the .cs file's job folder's
    parent), or the .cs file's own folder for hand-made files."""
    bases = [Path(project_dir)] if project_dir is not None else []
    # A job's own files sit in the project's J<n>/ folder; without stacks to tell, guess so.
    in_job = re.fullmatch(r"J\d+", path.parent.name) is not None
    bases += [path.parent.parent, path.parent] if in_job else [path.parent, path.parent.parent]
    unique = np.unique(stacks)
    relative = [s for s in unique if not Path(s).is_absolute()]
    if not relative:
        missing = [s for s in unique if not Path(s).is_file()]
        if missing and check_stacks:
            raise InputError(f"{path}: blob/path stack {missing[0]} not found")
        return path.parent
    for base in bases:
        if all((base / s).is_file() for s in relative):
            return base
    if check_stacks:
        first = relative[0]
        tried = ", ".join(str(b / first) for b in bases)
        raise InputError(f"{path}: blob/path stack {first} not found (looked for {tried}); "
                         "give the cryoSPARC project folder they are relative to (project_dir)")
    return bases[0]


def read_cs(cs_path, passthrough=None, pixel_size: float | None = None, require_ctf: bool = True,
            check_stacks: bool = True, project_dir=None) -> io.Particles:
    """Read a cryoSPARC particle ``.cs`` file into the :class:`cryoday.io.Particles` a STAR
    file of the same particles gives.

    Parameters
    ----------
    cs_path : str or Path
        The ``.cs`` file (a job's ``J24_particles.cs``, an export, or one written by us).
    passthrough : str, Path or list of them, optional
        The job's passthrough ``.cs`` file(s); found beside ``cs_path`` when not given and the
        file lacks image or CTF fields.
    pixel_size : float, optional
        Pixel size in A, used only when the file has no ``blob/psize_A``.
    require_ctf : bool
        Refuse files without the CTF fields the reconstruction needs.
    check_stacks : bool
        Open every stack's header (sets ``box``), as :func:`cryoday.io.read_particles` does.
    project_dir : str or Path, optional
        The folder ``blob/path`` is relative to, when it is neither the file's folder nor its
        parent (cryoSPARC's project folder).

    Returns
    -------
    cryoday.io.Particles
        ``star_path`` is ``cs_path``; ``table`` as :func:`cs_to_table` with optics merged onto
        every row; ``optics`` one row per exposure group.

    Raises
    ------
    InputError
        With the file, field and particle row of the problem.
    """
    path = Path(cs_path)
    data = load_cs(path)
    if len(data) == 0:
        raise InputError(f"{path}: the .cs file has no particles")
    explicit = passthrough is not None
    if explicit:
        passthroughs = [Path(p) for p in (passthrough if isinstance(passthrough, (list, tuple))
                                          else [passthrough])]
    else:
        needed = IMAGE_FIELDS + (CTF_FIELDS if require_ctf else ())
        lacking = any(f not in data.dtype.names for f in needed)
        passthroughs = passthrough_candidates(path)[:1] if lacking else []
    for extra in passthroughs:
        data = _merge_passthrough(path, data, extra)
    _check_fields(path, data, require_ctf, passthroughs, explicit)
    _check_values(path, data)
    table = cs_to_table(data, path)
    optics, particle_columns = _optics_table(table)
    # The same judgement of values (units, ranges) as a STAR file's, by column and row.
    io._check_values(path, table, optics, particle_columns)
    psize, _ = io._pixel_size(path, table, optics, pixel_size)
    names = table["rlnImageName"].str.partition("@")[2].to_numpy(str)
    base = _stack_base(path, names, project_dir, check_stacks)
    stacks = np.array([str(Path(s) if Path(s).is_absolute() else base / s)
                       for s in np.unique(names)])
    stack_paths = stacks[np.searchsorted(np.unique(names), names)]
    index = data["blob/idx"].astype(np.int64)
    io._refuse_duplicate_images(path, stack_paths, index)
    result = io.Particles(table, optics, path, psize, None, stack_paths, index, particle_columns)
    if check_stacks:
        io._check_stacks(result)
        if "rlnImageSize" in table and (table["rlnImageSize"] != result.box).any():
            row = int(np.flatnonzero(table["rlnImageSize"].to_numpy() != result.box)[0])
            raise InputError(
                f"{path}: blob/shape says {table['rlnImageSize'].iloc[row]} px at particle row "
                f"{row + 1} but the stacks hold {result.box} px images")
    if not np.isfinite(result.pixel_size):
        raise InputError(f"{path}: pixel size found nowhere (no blob/psize_A, no voxel size in "
                         "the stack header); set pixel_size for this dataset in the config")
    return result


def contrast_sign(particles: io.Particles) -> int | None:
    """cryoSPARC's ``blob/sign`` of the set (+1 or -1), or None when absent or mixed.

    Recorded, not acted on: cryoSPARC writes -1 for particles it extracted and particles it
    imported alike (the three real files in ../shared/data), so it does not tell bright from
    dark protein; cryoday's contrast detection decides.
    """
    if SIGN_COLUMN not in particles.table:
        return None
    signs = np.unique(np.sign(particles.table[SIGN_COLUMN].to_numpy()))
    return int(signs[0]) if len(signs) == 1 and signs[0] != 0 else None


# ----------------------------------------------------------------------------- writing


def _source_rows(path: Path, table: pd.DataFrame, source: np.ndarray, source_name) -> np.ndarray:
    """Row of ``source`` for each table row: by uid when the table has it, else by position."""
    if UID_COLUMN in table and "uid" in source.dtype.names:
        uid = table[UID_COLUMN].to_numpy(dtype=np.uint64)
        order = np.argsort(source["uid"], kind="stable")
        sorted_uid = source["uid"][order]
        at = np.minimum(np.searchsorted(sorted_uid, uid), max(len(sorted_uid) - 1, 0))
        found = (sorted_uid[at] == uid) if len(sorted_uid) else np.zeros(len(uid), bool)
        if not found.all():
            row = int(np.flatnonzero(~found)[0])
            raise InputError(f"{path}: particle row {row + 1} has uid {int(uid[row])}, which "
                             f"{source_name} does not hold")
        return order[at]
    if len(table) != len(source):
        raise InputError(f"{path}: {len(table)} particles but {source_name} has {len(source)} "
                         f"rows and the table no {UID_COLUMN} column to match them by")
    return np.arange(len(source))


def _new_uids(table: pd.DataFrame) -> np.ndarray:
    """Random-looking 64-bit uids, as cryoSPARC's, but the same for the same image names."""
    seed = zlib.crc32("\n".join(table["rlnImageName"].astype(str)).encode())
    rng = np.random.default_rng(seed)
    while True:
        uid = rng.integers(1, np.iinfo(np.uint64).max, size=len(table), dtype=np.uint64)
        if len(np.unique(uid)) == len(uid):
            return uid


def _fresh_dataset(path: Path, table: pd.DataFrame, psize: float, box) -> np.ndarray:
    """A particle .cs array (blob and ctf slots) from a RELION-labelled table alone."""
    n = len(table)
    name = table["rlnImageName"].astype(str)
    number, _, stacks = (name.str.partition("@")[i] for i in (0, 1, 2))
    if (stacks == "").any():
        stacks = stacks.where(stacks != "", number)
        number = number.where(name.str.contains("@"), "1")
    paths = stacks.to_numpy(str).astype(np.bytes_)
    if box is None and "rlnImageSize" in table:
        box = int(table["rlnImageSize"].iloc[0])
    if box is None:
        raise InputError(f"{path}: the image size is needed for blob/shape (no rlnImageSize "
                         "column; pass box)")

    def col(column, default):
        return (table[column].to_numpy(np.float64) if column in table
                else np.full(n, default, dtype=np.float64))

    missing = [c for c in io.CTF_COLUMNS if c not in table]
    if missing:
        raise InputError(f"{path}: the table lacks CTF column(s) {', '.join(missing)}")
    df_v = "rlnDefocusV" if "rlnDefocusV" in table else "rlnDefocusU"
    # (field, dtype, values): cryoSPARC's fields and dtypes for imported particles.
    fields = [
        ("uid", "<u8", table[UID_COLUMN].to_numpy(np.uint64) if UID_COLUMN in table
         else _new_uids(table)),
        ("blob/path", paths.dtype, paths),
        ("blob/idx", "<u4", number.astype(np.int64).to_numpy() - 1),
        ("blob/shape", ("<u4", (2,)), np.array([box, box])),
        ("blob/psize_A", "<f4", psize),
        # -1 is what cryoSPARC writes for its own and for imported RELION stacks alike.
        ("blob/sign", "<f4", col(SIGN_COLUMN, -1.0)),
        ("ctf/type", "S9", b"imported"),
        ("ctf/exp_group_id", "<u4", col("rlnOpticsGroup", 1).astype(np.int64) - 1),
        ("ctf/accel_kv", "<f4", col("rlnVoltage", 300.0)),
        ("ctf/cs_mm", "<f4", col("rlnSphericalAberration", 2.7)),
        ("ctf/amp_contrast", "<f4", col("rlnAmplitudeContrast", 0.1)),
        ("ctf/df1_A", "<f4", col("rlnDefocusU", 0.0)),
        ("ctf/df2_A", "<f4", col(df_v, 0.0)),
        ("ctf/df_angle_rad", "<f4", np.deg2rad(col("rlnDefocusAngle", 0.0))),
        ("ctf/phase_shift_rad", "<f4", np.deg2rad(col("rlnPhaseShift", 0.0))),
        ("ctf/scale", "<f4", 1.0),
        ("ctf/scale_const", "<f4", 0.0),
        ("ctf/bfactor", "<f4", col("rlnCtfBfactor", 0.0)),
    ]
    out = np.zeros(n, dtype=[(name, dt) for name, dt, _ in fields])
    for name, _, value in fields:
        out[name] = value
    return out


def write_cs(path, particles_table: pd.DataFrame, source_cs=None, pixel_size: float | None = None,
             box: int | None = None, class_posterior=None) -> None:
    """Write particles with their poses, shifts and classes as a cryoSPARC ``.cs`` file.

    Parameters
    ----------
    path : str or Path
        Output ``.cs``; written atomically.
    particles_table : pandas.DataFrame
        RELION-labelled table (``rlnAngleRot/Tilt/Psi`` degrees, ``rlnOriginX/YAngst`` A,
        ``rlnClassNumber`` from 1, optional ``rlnRandomSubset``). Its ``cryosparcUid`` column,
        when present, matches rows with ``source_cs``; otherwise rows match by position.
    source_cs : str, Path or numpy.ndarray, optional
        The ``.cs`` the particles came from. Every field of it is kept as it was (``uid``,
        ``blob/*``, ``ctf/*``, and ``alignments3D`` statistics we do not estimate) except
        ``alignments3D/pose``, ``shift``, ``psize_A``, ``class`` and ``split``, which are set
        from the table; missing ``alignments3D`` fields are added with cryoSPARC's dtypes.
        Without it, ``blob`` and ``ctf`` come from the table, with ``blob/path`` as the table's
        image paths (relative to the output's folder, as a STAR file's).
    pixel_size : float, optional
        Pixel size in A of the shifts; default the table's ``rlnImagePixelSize``, then the
        source's ``blob/psize_A``.
    box : int, optional
        Image size in px for ``blob/shape`` without a source (default ``rlnImageSize``).
    class_posterior : array_like, optional
        ``(n,)`` each particle's posterior of its class (``alignments3D/class_posterior``);
        by default the source's value, or 1 in a new slot.
    """
    path = Path(path)
    table = particles_table.reset_index(drop=True)
    source = None
    if source_cs is not None:
        source_name = source_cs if not isinstance(source_cs, np.ndarray) else "the source array"
        source = source_cs if isinstance(source_cs, np.ndarray) else load_cs(source_cs)
    psize = pixel_size
    if psize is None and "rlnImagePixelSize" in table:
        psize = float(np.median(table["rlnImagePixelSize"].to_numpy(np.float64)))
    if psize is None and source is not None and "blob/psize_A" in source.dtype.names \
            and len(source):
        psize = float(np.median(source["blob/psize_A"]))
    if psize is None or not psize > 0:
        raise InputError(f"{path}: no pixel size to turn shifts into pixels (no "
                         "rlnImagePixelSize column, no source blob/psize_A); pass pixel_size")
    if source is not None:
        base = source[_source_rows(path, table, source, source_name)]
    else:
        base = _fresh_dataset(path, table, psize, box)

    n = len(table)
    values = {}
    has_pose = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(table.columns)
    if has_pose:
        matrices = euler_to_matrix(table["rlnAngleRot"].to_numpy(np.float64),
                                   table["rlnAngleTilt"].to_numpy(np.float64),
                                   table["rlnAnglePsi"].to_numpy(np.float64))
        values["pose"] = matrix_to_pose(matrices)
        shift = np.zeros((n, 2))
        for i, axis in enumerate("XY"):
            if f"rlnOrigin{axis}Angst" in table:
                shift[:, i] = table[f"rlnOrigin{axis}Angst"].to_numpy(np.float64) / psize
            elif f"rlnOrigin{axis}" in table:  # already pixels (RELION 3.0)
                shift[:, i] = table[f"rlnOrigin{axis}"].to_numpy(np.float64)
        values["shift"] = shift
        values["psize_A"] = np.full(n, psize)
    if "rlnClassNumber" in table:
        classes = table["rlnClassNumber"].to_numpy(np.int64)
        if (classes < 1).any():
            row = int(np.flatnonzero(classes < 1)[0])
            raise InputError(f"{path}: rlnClassNumber {classes[row]} at particle row {row + 1}; "
                             "classes count from 1")
        values["class"] = classes - 1
    if class_posterior is not None:
        values["class_posterior"] = np.asarray(class_posterior, np.float32).reshape(n)
    if "rlnRandomSubset" in table:
        values["split"] = table["rlnRandomSubset"].to_numpy(np.int64) - 1
    if not values:
        raise InputError(f"{path}: the table has no poses (rlnAngleRot/Tilt/Psi) or classes "
                         "(rlnClassNumber) to write")

    existing = set(base.dtype.names)
    if any(f"alignments3D/{k}" not in existing for k in values):
        # A new slot gets all of cryoSPARC's alignments3D fields, so cryoSPARC accepts it.
        added = [(f"alignments3D/{k}", *ALIGNMENT_DTYPES[k]) for k in ALIGNMENT_DTYPES
                 if f"alignments3D/{k}" not in existing]
        out = np.zeros(len(base), dtype=_dtype_with(base.dtype, [
            (name, (dt, shape) if shape else dt) for name, dt, shape in added]))
        for name in base.dtype.names:
            out[name] = base[name]
        for name, _, _ in added:
            key = name.split("/", 1)[1]
            out[name] = _ALIGNMENT_FILL.get(key, 0)
            if key == "psize_A":
                out[name] = psize
    else:
        out = base.copy()
    for key, v in values.items():
        out[f"alignments3D/{key}"] = v
    with io.atomic_path(path) as tmp:
        # A file object, because numpy.save given a name not ending in .npy appends ".npy".
        with open(tmp, "wb") as f:
            np.save(f, out, allow_pickle=False)
