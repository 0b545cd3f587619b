"""Known-pose reconstruction (what ``relion_reconstruct`` does): direct Fourier insertion.

Each image's transform, phase-corrected for its shift and multiplied by its CTF, is inserted
into a 2x oversampled 3D transform at its central slice with trilinear weights (the adjoint of
the engine's slice interpolation), together with the squared CTF; their ratio, regularised by a
Wiener constant, is the least-squares estimate of the volume's transform. Hermitian symmetry
fills the other half. Images are streamed in chunks, so any stack size fits in memory.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
import scipy.fft as sfft

from cryoday import symmetry as point_groups
from cryoday._insert_kernels import flush, insert_images
from cryoday._symmetrise_kernels import symmetrise_cubes
from cryoday.batch import make_batch
from cryoday.fourier import fourier_crop_2d
from cryoday.projection import SliceOperator


class Sums(NamedTuple):
    """The insertion's sums on the operator's oversampled cube, Hermitian-completed:
    ``num = sum_i w_i CTF_i x_i`` and ``den = sum_i w_i CTF_i^2`` (both ``(m, m, m)``)."""

    op: SliceOperator
    num: np.ndarray  # complex128
    den: np.ndarray  # float64
    radius: float  # the cutoff (px of the output box)


def cutoff_radius(box: int, pixel_size: float, max_resolution_A: float | None = None) -> float:
    """Fourier radius (px) of a reconstruction: 1 px inside Nyquist, or ``max_resolution_A``."""
    radius = box / 2 - 1
    if max_resolution_A:
        radius = min(radius, box * pixel_size / max_resolution_A)
    return radius


# Poses a thread inserts in float32 before its sums are added into the double-precision cubes:
# a voxel then sums at most this many terms in single precision (relative rounding below ~1e-4
# even at the origin, which every pose reaches), and the adding costs ~5% of the insertion.
FLUSH_POSES_PER_THREAD = 4096

# Viewing directions are ordered in bands of this polar angle (radians), so consecutive planes
# are about a band apart and share most of the cube's cache lines.
LOCALITY_BAND = np.radians(2.0)


def locality_order(rotations: np.ndarray, image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """An order of the poses in which consecutive slices are nearly the same plane, each image's
    poses kept together: images by the viewing direction of their heaviest pose (bands of polar
    angle, azimuth back and forth), then their poses by theirs. A plane through the origin is the
    same for the normals ``n`` and ``-n``, so directions are folded onto one hemisphere.

    Insertion is bound by the cube's memory: in this order a thread's planes overlap in cache,
    and 20,000 random poses insert ~1.4x faster at a 128-px box than in particle order."""
    normal = np.asarray(rotations)[:, 2, :]
    normal = np.where(normal[:, 2:3] < 0, -normal, normal)
    polar = np.arccos(np.clip(normal[:, 2], -1.0, 1.0))
    azimuth = np.arctan2(normal[:, 1], normal[:, 0])
    band = np.floor(polar / LOCALITY_BAND)
    key = band * 8 + np.where(band % 2 == 0, azimuth, -azimuth)  # |azimuth| <= pi < 4
    heaviest = np.lexsort((-np.asarray(weights), image))
    first = np.r_[True, image[heaviest][1:] != image[heaviest][:-1]]
    image_key = np.zeros(int(image.max()) + 1 if len(image) else 0)
    image_key[image[heaviest][first]] = key[heaviest][first]
    return np.lexsort((key, image, image_key[image]))


def insert(read, n: int, rotations: np.ndarray, shifts_px: np.ndarray, ctf_params: dict,
           pixel_size: float, box: int, max_resolution_A: float | None = None,
           chunk_size: int = 500, weights: np.ndarray | None = None,
           image: np.ndarray | None = None) -> Sums:
    """Insert every image at its pose (streamed in chunks); the arguments as :func:`reconstruct`'s.

    With ``image`` (``(n,)`` ints) the ``n`` rows are poses of the images ``image``: ``read``
    and ``ctf_params`` are then over images, and each image is transformed once however many
    poses it has (they are inserted together). The poses are inserted in
    :func:`locality_order`, ``chunk_size`` at a time.
    """
    radius = cutoff_radius(box, pixel_size, max_resolution_A)
    op = SliceOperator(box, radius)
    size = op._cube_size
    threads = numba.get_num_threads()
    image = np.arange(n) if image is None else np.asarray(image, np.int64)
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    rotations = np.asarray(rotations, np.float64)
    shifts = np.asarray(shifts_px, np.float64)
    acc = np.zeros((threads, size, size, size, 4), dtype=np.float32)
    num = np.zeros((size, size, size), dtype=np.complex128)
    den = np.zeros((size, size, size), dtype=np.float64)
    ix = op.kx.astype(np.int64) + box // 2
    iy = op.ky.astype(np.int64) + box // 2
    order = locality_order(rotations, image, weights) if n else np.zeros(0, np.int64)
    since_flush = 0
    for start in range(0, n, chunk_size):
        rows = order[start:start + chunk_size]
        which, of = np.unique(image[rows], return_inverse=True)
        images = read(which)
        if images.shape[-1] != box:
            images = fourier_crop_2d(images, box)
        ctf = {k: (np.asarray(v)[which] if np.ndim(v) else v) for k, v in ctf_params.items()}
        batch = make_batch(op, images, ctf, pixel_size, 1.0, padded=False)
        insert_images(batch.data, batch.ctf, of.astype(np.int64), np.ascontiguousarray(
            shifts[rows]), np.ascontiguousarray(weights[rows]), np.ascontiguousarray(
            rotations[rows]), op._kx64, op._ky64, ix, iy, box, float(op._half_cube), acc)
        since_flush += len(rows)
        if since_flush >= FLUSH_POSES_PER_THREAD * threads:
            flush(acc, num, den)
            since_flush = 0
    flush(acc, num, den)
    del acc  # before the completion's copies: the job's peak memory is here
    # Hermitian symmetry: the inserted half plane's mirror images at -q (numpy copies the
    # overlapping operand, so the sums are completed in place but for one copy).
    num += np.conj(num[::-1, ::-1, ::-1])
    den += den[::-1, ::-1, ::-1]
    return Sums(op, num, den, float(radius))


@functools.lru_cache(maxsize=4)
def _outside_cutoff(cube_size: int, half_cube: int, radius: float) -> np.ndarray:
    """The voxels of an operator's cube (2x oversampled) beyond ``radius`` (px of the output
    box), from broadcast squares rather than three index cubes (the final map solves three
    times at a 128-px box, where those took 0.75 s each)."""
    k2 = ((np.arange(cube_size) - half_cube) ** 2).astype(np.float64)
    return 0.25 * (k2[:, None, None] + k2[None, :, None] + k2[None, None, :]) > radius**2


def solve(sums: Sums, wiener: float = 1e-3, regulariser: np.ndarray | None = None
          ) -> np.ndarray:
    """The volume from the insertion's sums: ``num / (den + floor)`` per voxel, back to real
    space at the output box.

    ``floor`` is ``wiener`` times the mean ``den`` over the filled voxels, or, when given,
    ``regulariser`` (``(m, m, m)``, per voxel: e.g. ``1 / tau^2`` of a Wiener filter, in the
    units of ``den``) instead.
    """
    op, num, den, radius = sums
    box = op.box
    filled = den > 0
    if regulariser is None:
        floor = wiener * (den[filled].mean() if filled.any() else 1.0)
    else:
        floor = np.where(filled, regulariser, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = np.where(filled, num / (op._scale * (den + floor)), 0)
    # Only coefficients inside the cutoff sphere were measured; zero the rest of the cube.
    estimate[_outside_cutoff(op._cube_size, op._half_cube, float(radius))] = 0
    m = 2 * box
    spectrum = np.zeros((m, m, m), dtype=np.complex128)
    spec, sub = op._window()
    spectrum[spec, spec, spec] = estimate[sub, sub, sub]
    # The sums are Hermitian and zero on the padded spectrum's Nyquist planes (the cutoff is
    # inside Nyquist), so the real inverse FFT of the half spectrum is the inverse transform's
    # real part exactly, at half its cost.
    half = sfft.ifftshift(spectrum)[..., :m // 2 + 1]
    padded = sfft.fftshift(sfft.irfftn(half, s=(m, m, m), norm="ortho", workers=-1))
    lo = m // 2 - box // 2
    volume = padded[lo:lo + box, lo:lo + box, lo:lo + box]
    return op._corrected(volume).astype(np.float32) * 1.0


def reconstruct(read, n: int, rotations: np.ndarray, shifts_px: np.ndarray, ctf_params: dict,
                pixel_size: float, box: int, max_resolution_A: float | None = None,
                wiener: float = 1e-3, chunk_size: int = 500, image_box: int | None = None,
                weights: np.ndarray | None = None, symmetry: str = "C1") -> np.ndarray:
    """Least-squares volume from images with known poses, shifts and CTFs.

    Parameters
    ----------
    read : callable ``rows -> (m, image_box, image_box)`` float32 images (protein bright)
    n : number of images
    rotations : (n, 3, 3) RELION matrices
    shifts_px : (n, 2) RELION origins in pixels of the *output* box
    ctf_params : dict of (n,) arrays (``cryoday.ctf.evaluate_ctf`` arguments)
    pixel_size : A/px of the output box
    box : output box; images of another size are Fourier-cropped to it
    max_resolution_A : optional cutoff (default: 1 px inside Nyquist)
    wiener : regulariser, relative to the mean CTF^2 weight per voxel inside the cutoff
    weights : optional (n,) weight of each image in the sums (a pose posterior's masses, when
        one image appears once per pose it may take); default 1
    symmetry : point group (RELION's names); each image counts at its pose's ``|G|``
        equivalents ``A g`` (:func:`insert_symmetric`), as in ``relion_reconstruct --sym``,
        so the map comes out symmetric about RELION's axes.
    """
    return solve(insert_symmetric(read, n, rotations, shifts_px, ctf_params, pixel_size, box,
                                  symmetry, max_resolution_A, chunk_size, weights), wiener)


def symmetrise(sums: Sums, symmetry: str) -> Sums:
    """The sums of every pose's ``|G|`` equivalents from those of the poses alone:
    ``sum_g S(g p)`` by trilinear lookup in the oversampled cube (RELION's
    ``applyPointGroupSymmetry``), within the cutoff and the one voxel the insertion spreads
    beyond it; ``sums`` itself, unchanged, for C1. One pass over the cube, however many poses
    were inserted: at a 128-px box ~4.4 s for D7 on 2 cores, against inserting 14 times the
    poses.

    In place: the kernel reads a float32 copy of the cubes and writes the result over them, so
    the job's peak memory stays the insertion's."""
    ops = np.ascontiguousarray(point_groups.group(symmetry), dtype=np.float64)
    if len(ops) == 1:
        return sums
    half_cube = float(sums.op._half_cube)
    rmax = min(2.0 * sums.radius + 2.0, half_cube)
    symmetrise_cubes(sums.num, sums.den, ops, half_cube, rmax, sums.num, sums.den)
    return sums


def insert_symmetric(read, n: int, rotations: np.ndarray, shifts_px: np.ndarray,
                     ctf_params: dict, pixel_size: float, box: int, symmetry: str,
                     max_resolution_A: float | None = None, chunk_size: int = 500,
                     weights: np.ndarray | None = None, image: np.ndarray | None = None) -> Sums:
    """:func:`insert` with every pose at its ``|G|`` equivalents ``A g``: each pose inserted
    once, then the sums symmetrised (:func:`symmetrise`; with C1, :func:`insert` itself). The
    arguments are :func:`insert`'s; :func:`insert_expanded` inserts the equivalents one by one
    (the slow reference)."""
    return symmetrise(insert(read, n, rotations, shifts_px, ctf_params, pixel_size, box,
                             max_resolution_A, chunk_size, weights, image), symmetry)


# Expanded poses (each pose times |G|) made at once with a point group: ~110 bytes each (a
# rotation, a shift, a weight, an image index), 55 MB, against accumulator cubes that are
# ~1 GB at a 128-px box, whose fresh allocation per block this keeps rare.
SYMMETRY_BLOCK_POSES = 1 << 19


def insert_expanded(read, n: int, rotations: np.ndarray, shifts_px: np.ndarray,
                    ctf_params: dict, pixel_size: float, box: int, symmetry: str,
                    max_resolution_A: float | None = None, chunk_size: int = 500,
                    weights: np.ndarray | None = None, image: np.ndarray | None = None,
                    block_poses: int = SYMMETRY_BLOCK_POSES) -> Sums:
    """:func:`insert` with every pose expanded into its ``|G|`` equivalents ``A g``, each
    inserted as a pose of its own (what ``relion_reconstruct --sym`` amounts to, at ``|G|``
    times the cost of :func:`insert_symmetric`, which it checks).

    A volume with ``V(g r) = V(r)`` gives the same image at ``A`` and ``A g``
    (:mod:`cryoday.symmetry`), so each image also measures the slices at ``A g``. The ``n``
    poses are expanded ``block_poses // |G|`` at a time, pose-major (each pose's equivalents,
    and with ``image`` each image's poses, stay together, as :func:`insert` wants them), and the
    blocks' sums added. The arguments are :func:`insert`'s.
    """
    size = point_groups.order(symmetry)
    image = np.arange(n) if image is None else np.asarray(image, np.int64)
    weights = None if weights is None else np.asarray(weights, np.float64)
    shifts_px = np.asarray(shifts_px, np.float64)
    per_block = max(1, block_poses // size)
    total = None
    for start in range(0, max(n, 1), per_block):
        rows = slice(start, min(start + per_block, n))
        n_rows = len(image[rows])
        sums = insert(read, n_rows * size, point_groups.expand_poses(rotations[rows], symmetry),
                      np.repeat(shifts_px[rows], size, axis=0), ctf_params, pixel_size, box,
                      max_resolution_A, chunk_size,
                      None if weights is None else np.repeat(weights[rows], size),
                      image=np.repeat(image[rows], size))
        total = sums if total is None else total._replace(num=total.num + sums.num,
                                                          den=total.den + sums.den)
    return total


def half_sets(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of ``n`` particles (gold-standard FSC)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])
