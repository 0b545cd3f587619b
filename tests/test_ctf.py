"""RELION's CTF: an independent formulation, known values, and the sign on real particles."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pytest
import starfile

from cryoday import simulate
from cryoday.ctf import electron_wavelength, evaluate_ctf
from cryoday.fourier import ift2
from cryoday.geometry import euler_to_matrix

warnings.filterwarnings("ignore", module="mrcfile")


def relion_get_ctf(fx, fy, du, dv, angle, kv, cs, q, bfac=0.0, phase=0.0):
    """RELION's CTF::getCTF, transcribed from its own formulation (ctf.h / ctf.cpp)."""
    v = kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))
    k1 = np.pi / 2 * 2 * lam
    k2 = np.pi / 2 * cs * 1e7 * lam**3
    k3 = np.arctan(q / np.sqrt(1 - q * q))
    k4 = -bfac / 4.0
    k5 = np.deg2rad(phase)
    defocus_average = -(du + dv) * 0.5
    defocus_deviation = -(du - dv) * 0.5
    u2 = fx * fx + fy * fy
    ellipsoid = np.arctan2(fy, fx) - np.deg2rad(angle)
    deltaf = defocus_average + defocus_deviation * np.cos(2 * ellipsoid)
    argument = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -np.sin(argument) * np.exp(k4 * u2)


def test_matches_relions_formulation(rng):
    fx, fy = rng.uniform(-0.25, 0.25, (2, 500))
    for du, dv, angle, kv, cs, q, b, ph in [(15000, 14000, 30, 300, 2.7, 0.1, 0, 0),
                                            (25000, 25000, 0, 200, 2.0, 0.07, 50, 0),
                                            (8000, 7000, 120, 300, 0.01, 0.1, 0, 90)]:
        ours = evaluate_ctf(fx, fy, du, dv, angle, kv, cs, q, b, ph)
        theirs = relion_get_ctf(fx, fy, du, dv, angle, kv, cs, q, b, ph)
        assert np.allclose(ours, theirs, atol=2e-6)


def test_known_values():
    assert electron_wavelength(300) == pytest.approx(0.019687, abs=1e-6)
    assert electron_wavelength(200) == pytest.approx(0.025079, abs=1e-6)
    # Positive (amplitude contrast Q) at zero frequency, as in RELION.
    assert evaluate_ctf(0.0, 0.0, 20000, 20000, 0, 300, 2.7, 0.1) == pytest.approx(0.1, rel=1e-6)
    # First zero without Cs and Q: pi lambda dz s^2 = pi.
    s0 = 1 / np.sqrt(electron_wavelength(300) * 20000)
    assert abs(evaluate_ctf(s0, 0.0, 20000, 20000, 0, 300, 0.0, 0.0)) < 1e-5


def test_phase_shift():
    # A 90-degree phase plate turns the low-frequency CTF from Q into ~sqrt(1 - Q^2).
    assert evaluate_ctf(0.0, 0.0, 20000, 20000, 0, 300, 2.7, 0.1, phase_shift=90.0) == (
        pytest.approx(np.sqrt(1 - 0.01), rel=1e-6))
    fx = np.linspace(0, 0.2, 50)
    shifted = evaluate_ctf(fx, 0.0, 20000, 20000, 0, 300, 2.7, 0.1, phase_shift=30.0)
    chi = np.pi * electron_wavelength(300) * 20000 * fx**2 - np.pi / 2 * 2.7e7 * (
        electron_wavelength(300) ** 3) * fx**4 + np.deg2rad(30.0)
    assert np.allclose(shifted, np.sqrt(0.99) * np.sin(chi) + 0.1 * np.cos(chi), atol=2e-6)


def test_astigmatism_axes_and_envelope():
    s = 0.05
    a = evaluate_ctf(s, 0.0, 20000, 10000, 0, 300, 2.7, 0.1)   # along U
    b = evaluate_ctf(0.0, s, 10000, 10000, 0, 300, 2.7, 0.1)   # isotropic at V
    c = evaluate_ctf(0.0, s, 20000, 20000, 0, 300, 2.7, 0.1)   # isotropic at U
    u_along_y = evaluate_ctf(0.0, s, 20000, 10000, 90, 300, 2.7, 0.1)
    assert a == pytest.approx(float(c), abs=1e-6) and u_along_y == pytest.approx(float(c), abs=1e-6)
    assert float(evaluate_ctf(0.0, s, 20000, 10000, 0, 300, 2.7, 0.1)) == pytest.approx(float(b),
                                                                                        abs=1e-6)
    plain = evaluate_ctf(s, 0.0, 20000, 20000, 0, 300, 2.7, 0.1)
    damped = evaluate_ctf(s, 0.0, 20000, 20000, 0, 300, 2.7, 0.1, bfactor=100.0)
    assert damped == pytest.approx(float(plain) * np.exp(-100 * s * s / 4), rel=1e-5)


def test_sign_on_real_trpv1_particles(shared_data):
    """The real TRPV1 images equal +CTF * projection at their stored poses (SOURCES.md)."""
    # Read with starfile/mrcfile directly so this test does not depend on cryoday.io.
    star = starfile.read(shared_data / "cryojax/trpv1_small_stack.star")
    optics, table = star["optics"].iloc[0], star["particles"]
    images = mrcfile.read(shared_data / "cryojax/trpv1_small_stack.mrcs").astype(np.float64)
    volume = mrcfile.read(shared_data / "cryojax/trpv1_volume.mrc").astype(np.float32)
    box, psize = int(optics.rlnImageSize), float(optics.rlnImagePixelSize)
    assert images.shape == (len(table), box, box)
    pose = {"rot": table.rlnAngleRot.to_numpy(), "tilt": table.rlnAngleTilt.to_numpy(),
            "psi": table.rlnAnglePsi.to_numpy(), "shift_x": table.rlnOriginXAngst.to_numpy(),
            "shift_y": table.rlnOriginYAngst.to_numpy()}
    ctf = {"defocus_u": table.rlnDefocusU.to_numpy(), "defocus_v": table.rlnDefocusV.to_numpy(),
           "defocus_angle": table.rlnDefocusAngle.to_numpy(),
           "voltage": float(optics.rlnVoltage), "cs": float(optics.rlnSphericalAberration),
           "amplitude_contrast": float(optics.rlnAmplitudeContrast),
           "bfactor": table.rlnCtfBfactor.to_numpy(), "phase_shift": table.rlnPhaseShift.to_numpy()}

    k = (np.arange(box) - box // 2) / (box * psize)
    fy, fx = np.meshgrid(k, k, indexing="ij")
    c = evaluate_ctf(fx, fy, **ctf)

    def model(rot, tilt, psi, shifts_px):
        proj = simulate.project_ft(volume, euler_to_matrix(rot, tilt, psi))
        return ift2(c * proj * simulate.shift_phase(box, shifts_px))

    def mean_cc(models):
        return np.mean([np.corrcoef(m.ravel(), i.ravel())[0, 1] for m, i in zip(models, images)])

    shifts = np.stack([pose["shift_x"], pose["shift_y"]], 1) / psize
    at_poses = mean_cc(model(pose["rot"], pose["tilt"], pose["psi"], shifts))
    rng = np.random.default_rng(0)
    random = []
    for _ in range(3):
        other = simulate.random_poses(len(images), rng, 0.0)
        random.append(mean_cc(model(other["rot"], other["tilt"], other["psi"], shifts)))
    assert at_poses > 0.12  # SOURCES.md: 0.14-0.22 per image with this sign
    assert at_poses > max(random) + 0.05
    assert mean_cc(-model(pose["rot"], pose["tilt"], pose["psi"], shifts)) < 0
