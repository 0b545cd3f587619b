"""Contrast transfer function in RELION's conventions (see ``docs/conventions.md``)."""

from __future__ import annotations

import numpy as np


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v + 0.978466e-6 * v * v)


def evaluate_ctf(
    fx,
    fy,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage,
    cs,
    amplitude_contrast,
    bfactor=0.0,
    phase_shift=0.0,
) -> np.ndarray:
    """RELION's CTF at spatial frequencies ``(fx, fy)`` in 1/Angstrom.

    Parameters
    ----------
    fx, fy : array_like
        Spatial frequencies in 1/A, shape ``(n,)`` or any shape broadcastable with the per-image
        parameters after they gain a trailing axis.
    defocus_u, defocus_v : float or array_like, shape (B,)
        Defocus in Angstrom, positive for underfocus (``rlnDefocusU``, ``rlnDefocusV``).
    defocus_angle : float or array_like
        Astigmatism angle in degrees (``rlnDefocusAngle``).
    voltage : float or array_like
        Acceleration voltage in kV (``rlnVoltage``).
    cs : float or array_like
        Spherical aberration in mm (``rlnSphericalAberration``).
    amplitude_contrast : float or array_like
        Amplitude contrast fraction Q (``rlnAmplitudeContrast``).
    bfactor : float or array_like
        Envelope B-factor in A^2 (``rlnCtfBfactor``); 0 means no envelope.
    phase_shift : float or array_like
        Phase-plate shift in degrees (``rlnPhaseShift``).

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(B,) + fx.shape`` (or ``fx.shape`` for scalar parameters); positive
        at low frequency, as in RELION, so protein-bright images equal ``CTF * projection``.
    """
    params = [
        np.asarray(p, dtype=np.float64)
        for p in (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, bfactor,
                  phase_shift)
    ]
    fx = np.asarray(fx, dtype=np.float64)
    fy = np.asarray(fy, dtype=np.float64)
    extra = (np.newaxis,) * fx.ndim
    du, dv, ang, kv, cs_mm, q, bf, ps = (p[(...,) + extra] for p in params)
    lam = electron_wavelength(kv)
    s2 = fx * fx + fy * fy
    alpha = np.arctan2(fy, fx)
    dz = 0.5 * (du + dv + np.cos(2.0 * (alpha - np.deg2rad(ang))) * (du - dv))
    cs_a = cs_mm * 1e7
    chi = np.pi * lam * dz * s2 - 0.5 * np.pi * cs_a * lam**3 * s2 * s2 + np.deg2rad(ps)
    ctf = np.sqrt(1.0 - q * q) * np.sin(chi) + q * np.cos(chi)
    ctf = ctf * np.exp(-bf * s2 / 4.0)
    return ctf.astype(np.float32)
