"""Rotations in RELION's conventions.

RELION's Euler angles (rot, tilt, psi), in degrees, are ZYZ and define the matrix ``A`` of
``Euler_angles2matrix``; a volume seen at pose ``A`` projects as ``P(x, y) = sum_z V(A^T r)``.
See ``docs/conventions.md``.
"""

from __future__ import annotations

import numpy as np


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` for arrays of angles in degrees.

    Parameters
    ----------
    rot, tilt, psi : float or array_like
        Euler angles in degrees (``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi``).

    Returns
    -------
    numpy.ndarray
        ``(..., 3, 3)`` float64 rotation matrices.
    """
    a, b, g = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(np.broadcast(a, b, g).shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_to_matrix` (RELION's ``Euler_matrix2angles``), degrees.

    Tilt is in [0, 180]; at the poles (tilt 0 or 180) psi is set to 0 and rot carries the whole
    in-plane angle, as RELION does.
    """
    m = np.asarray(matrices, dtype=np.float64)
    sb = np.hypot(m[..., 0, 2], m[..., 1, 2])
    tilt = np.arctan2(sb, m[..., 2, 2])
    regular = sb > 16 * np.finfo(np.float64).eps
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    psi = np.where(regular, np.arctan2(m[..., 1, 2], -m[..., 0, 2]), 0.0)
    # At the poles A = Rz(psi + rot) (tilt 0) or Rz(psi - rot) Ry(180): put it all in rot.
    pole_rot = np.where(
        m[..., 2, 2] > 0,
        np.arctan2(m[..., 0, 1], m[..., 0, 0]),
        np.arctan2(-m[..., 0, 1], -m[..., 0, 0]),
    )
    rot = np.where(regular, rot, pole_rot)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)
