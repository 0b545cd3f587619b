"""Alignment of two maps (rotation, translation and hand) and FSC after alignment.

Ab initio reconstruction cannot know the absolute orientation, position or handedness of the
molecule, so a map is compared with a reference only after finding them: a global search over a
rotation grid on low-passed, downsampled maps (for the map and its mirror image), the translation
for each rotation from an FFT cross-correlation, then a local refinement of the best candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from cryoday.fourier import fourier_crop_3d
from cryoday.fsc import fsc, resolution_at
from cryoday.geometry import euler_to_matrix
from cryoday.quadrature import directions_to_euler, fibonacci_sphere


@dataclass
class Alignment:
    """``apply_alignment(moving, a)`` ~ reference: ``R`` rotates the (possibly mirrored) map about
    its centre voxel, then it is shifted by ``shift_px`` (x, y, z)."""

    rotation: np.ndarray
    shift_px: np.ndarray
    flipped: bool
    correlation: float


def _transform(volume, rotation, shift_px, order=1):
    """``out(x) = volume(R^T (x - c - t) + c)``, coordinates (x, y, z), arrays [z, y, x]."""
    n = volume.shape[0]
    c = np.full(3, n // 2, dtype=np.float64)
    # map_coordinates works on array axes (z, y, x): permute the rotation accordingly.
    perm = [2, 1, 0]
    rt = rotation.T[np.ix_(perm, perm)]
    t = np.asarray(shift_px, dtype=np.float64)[perm]
    offset = c - rt @ (c + t)
    return ndimage.affine_transform(volume, rt, offset=offset, order=order, mode="constant")


def apply_alignment(volume: np.ndarray, alignment: Alignment, order: int = 3) -> np.ndarray:
    """The moving map brought onto the reference's frame."""
    v = volume[::-1] if alignment.flipped else volume
    return _transform(np.ascontiguousarray(v, dtype=np.float64), alignment.rotation,
                      alignment.shift_px, order=order).astype(np.float32)


def _normalise(v):
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-30)


def _best_shift(moving, reference_ft, max_shift):
    """Integer shift (x, y, z) to apply to ``moving`` to best match the reference, and the score.

    ``ifft(F_m conj(F_r))(s) = sum_x m(x + s) r(x)``: a peak at ``s`` means moving by ``-s``.
    """
    cc = np.fft.ifftn(np.fft.fftn(moving) * reference_ft).real
    n = moving.shape[0]
    cc = np.fft.fftshift(cc)
    c = n // 2
    lo, hi = max(0, c - max_shift), min(n, c + max_shift + 1)
    window = cc[lo:hi, lo:hi, lo:hi]
    z, y, x = np.unravel_index(np.argmax(window), window.shape)
    return -np.array([x + lo - c, y + lo - c, z + lo - c], dtype=np.float64), float(window.max())


def search_rotations(step_deg: float) -> np.ndarray:
    """Rotations covering SO(3) at about ``step_deg``: spiral directions x in-plane angles."""
    step = np.radians(step_deg)
    directions = fibonacci_sphere(int(np.ceil((3.6 / step) ** 2)))
    rot, tilt = directions_to_euler(directions)
    n_inp = int(np.ceil(2 * np.pi / step))
    psi = np.arange(n_inp) * 360.0 / n_inp
    return euler_to_matrix(np.repeat(rot, n_inp), np.repeat(tilt, n_inp), np.tile(psi, len(rot)))


def find_alignment(moving: np.ndarray, reference: np.ndarray, pixel_size: float,
                   step_deg: float = 15.0, n_refine: int = 3) -> Alignment:
    """Rotation, shift and hand that best superimpose ``moving`` on ``reference`` (same box)."""
    n = reference.shape[0]
    # The global search runs on maps cropped to ~24 px (enough for ~12-degree steps at the
    # particle's edge), over ~12-degree rotation steps for both hands; the best candidates are
    # then refined locally at full size.
    small = min(n - n % 2, 24)
    ref_s = _normalise(fourier_crop_3d(reference, small).astype(np.float64))
    ref_ft = np.conj(np.fft.fftn(ref_s))
    rotations = search_rotations(step_deg)
    candidates = []
    for flipped in (False, True):
        mov = fourier_crop_3d(moving[::-1] if flipped else moving, small).astype(np.float64)
        mov = _normalise(mov)
        for rotation in rotations:
            turned = _transform(mov, rotation, np.zeros(3))
            shift, score = _best_shift(turned, ref_ft, small // 4)
            candidates.append((score, flipped, rotation, shift))
    candidates.sort(key=lambda c: -c[0])
    scale = n / small
    ref_full = _normalise(reference.astype(np.float64))
    best = None
    for score, flipped, rotation, shift in candidates[:n_refine]:
        mov = moving[::-1] if flipped else moving
        mov = _normalise(np.ascontiguousarray(mov, dtype=np.float64))

        def cost(p, mov=mov):
            r = Rotation.from_rotvec(p[:3]).as_matrix()
            return -float(np.sum(_transform(mov, r, p[3:]) * ref_full))

        rv0 = Rotation.from_matrix(rotation).as_rotvec()
        p0 = np.concatenate([rv0, shift * scale])
        fit = optimize.minimize(cost, p0, method="Powell",
                                options={"xtol": 1e-3, "ftol": 1e-6, "maxfev": 600})
        if best is None or -fit.fun > best.correlation:
            best = Alignment(Rotation.from_rotvec(fit.x[:3]).as_matrix(), fit.x[3:], flipped,
                             -float(fit.fun))
    return best


def fsc_after_alignment(volume: np.ndarray, reference: np.ndarray, pixel_size: float,
                        mask=None):
    """Align ``volume`` to ``reference``, then their FSC.

    Returns ``(alignment, freq (1/A), fsc, resolution at 0.143 in A)``.
    """
    alignment = find_alignment(volume, reference, pixel_size)
    aligned = apply_alignment(volume, alignment)
    freq, curve = fsc(aligned, reference, pixel_size, mask=mask)
    return alignment, freq, curve, resolution_at(freq, curve, 0.143)
