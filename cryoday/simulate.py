"""Simulated particle sets by the paper's generative model (Eq. 1-2).

The projector here is deliberately **not** the reconstruction engine's operator, so tests never
commit the inverse crime of generating and fitting data with the same approximation: it slices
a 2x zero-padded transform with a 4-tap-per-axis cubic convolution kernel (Keys, a = -0.5),
whereas the engine interpolates trilinearly.

Measured accuracy: relative L2 error 0.24-0.30% against a brute-force real-space projection
(cubic-spline rotation of the volume, summed along z) for the synthetic molecule at 40 and 64 px;
correlation 0.9997-0.9998 with RELION's own ``relion_project`` images (``aspire/rln_proj_65_*``).
The cubic slicer dominates the cost; ``extraction="cropped"`` adds the CTF on a patch twice the
box; coloured noise adds one filter per image.

Beyond the paper's clean model (white noise, small shifts) the simulator makes data that look
like a facility's: coloured noise (:func:`noise_power`), a B-factor envelope, defocus per
particle or per micrograph, large shifts with or without wrap-around, and junk (pure noise or
another map's projections) flagged in the STAR column :data:`JUNK_COLUMN`; see
:func:`simulate_chunks`. Their defaults reproduce the clean model bit for bit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.fft as sfft

from cryoday import tunables
from cryoday._simulate_kernels import slice_cubic
from cryoday.ctf import evaluate_ctf
from cryoday.errors import InputError
from cryoday.fourier import ft2, ft3, ift2
from cryoday.geometry import euler_to_matrix, matrix_to_euler


def padded_spectrum(volume: np.ndarray) -> np.ndarray:
    """Centred unitary transform of ``volume`` zero-padded to twice its box.

    Returned as complex64: the slicer is memory-bound on this ``(2N)^3`` array (256 MB in
    complex128 at N = 128), and single precision (rel. 1e-7) is far below the interpolation error.
    """
    n = volume.shape[0]
    m = 2 * n
    padded = np.zeros((m, m, m), dtype=np.float64)
    lo = m // 2 - n // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = volume
    return np.ascontiguousarray(ft3(padded), dtype=np.complex64)


def project_ft(volume: np.ndarray, rotations: np.ndarray, spectrum: np.ndarray | None = None
               ) -> np.ndarray:
    """Centred unitary 2D transforms of the projections of ``volume`` at RELION matrices.

    By the Fourier slice theorem with unitary transforms, ``ft2(P)(k) = 2^1.5 sqrt(N)
    ft3(V_padded)(2k)`` for a 2x padded ``N^3`` volume.
    """
    n = volume.shape[0]
    spectrum = padded_spectrum(volume) if spectrum is None else spectrum
    rotations = np.ascontiguousarray(np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3))
    out = np.empty((len(rotations), n, n), dtype=np.complex128)
    slice_cubic(spectrum, rotations, n, out)
    return out * (2.0**1.5 * np.sqrt(n))


def shift_phase(box: int, shifts_px: np.ndarray) -> np.ndarray:
    """``exp(+2 pi i k.o / box)``: moves an image by minus the RELION origin ``o`` (px).

    Returns complex128 ``(n, box, box)``; built as an outer product of per-axis phases (2N
    exponentials per image instead of N^2).
    """
    k = np.arange(box) - box // 2
    o = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    px = np.exp(2j * np.pi * k[None, :] * o[:, 0, None] / box)
    py = np.exp(2j * np.pi * k[None, :] * o[:, 1, None] / box)
    return py[:, :, None] * px[:, None, :]


def project(volume: np.ndarray, rotations: np.ndarray, shifts_px: np.ndarray | None = None
            ) -> np.ndarray:
    """Real-space projections ``P(x, y) = sum_z V(A^T r)`` at RELION matrices ``A``.

    Parameters
    ----------
    volume : (N, N, N) array, ``[z, y, x]``
    rotations : (n, 3, 3) RELION rotation matrices (:func:`cryoday.geometry.euler_to_matrix`)
    shifts_px : (n, 2) array, optional
        RELION origins (``rlnOriginX/Y`` in px): each image is its projection moved by minus it.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, N, N)``.
    """
    spectra = project_ft(volume, rotations)
    if shifts_px is not None:
        spectra = spectra * shift_phase(volume.shape[0], shifts_px)
    return ift2(spectra).astype(np.float32)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Rotations uniform on SO(3) (Haar measure), from normalised Gaussian quaternions."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def random_poses(n: int, rng: np.random.Generator, shift_sigma_A: float,
                 pixel_size: float | None = None) -> dict[str, np.ndarray]:
    """Uniform random poses in RELION's parametrisation.

    Parameters
    ----------
    n : int
        Number of poses.
    rng : numpy.random.Generator
        Source of randomness (rotations are drawn first, then shifts).
    shift_sigma_A : float
        Standard deviation of each origin component, Angstrom.
    pixel_size : float, optional
        Angstrom per pixel; when given, the origins are also returned in pixels.

    Returns
    -------
    dict of numpy.ndarray
        ``rot``, ``tilt``, ``psi`` (degrees, RELION ZYZ, uniform on SO(3)), ``shift_x``,
        ``shift_y`` (``rlnOriginX/YAngst``, A) and, with ``pixel_size``, ``shift_x_px``,
        ``shift_y_px``.
    """
    rot, tilt, psi = matrix_to_euler(random_rotations(n, rng))
    shifts = rng.normal(scale=shift_sigma_A, size=(n, 2))
    poses = {"rot": rot, "tilt": tilt, "psi": psi, "shift_x": shifts[:, 0],
             "shift_y": shifts[:, 1]}
    if pixel_size is not None:
        poses["shift_x_px"] = shifts[:, 0] / pixel_size
        poses["shift_y_px"] = shifts[:, 1] / pixel_size
    return poses


def optics_table(pixel_size: float, box: int, voltage: float, cs: float,
                 amplitude_contrast: float) -> pd.DataFrame:
    """A one-group RELION optics table."""
    return pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [amplitude_contrast], "rlnSphericalAberration": [cs],
        "rlnVoltage": [voltage], "rlnImagePixelSize": [pixel_size], "rlnImageSize": [box],
        "rlnImageDimensionality": [2],
    })


# ----------------------------------------------------------------------------- the data set

#: Column of a simulated STAR file saying what each row really is (written only when
#: ``junk_fraction > 0``): 0 a particle of the map, 1 pure noise, 2 a projection of another map.
JUNK_COLUMN = "cryodaySimJunk"
JUNK_NONE, JUNK_NOISE, JUNK_OTHER = 0, 1, 2
JUNK_KINDS = ("noise", "other_map", "mixed")
EXTRACTIONS = ("periodic", "cropped")


def _spectrum_shape(noise_spectrum) -> tuple[float, float] | None:
    """``(low_to_high, falloff_A)`` of a coloured spectrum, None for white noise."""
    if noise_spectrum is None or (isinstance(noise_spectrum, str) and noise_spectrum == "white"):
        return None
    if not isinstance(noise_spectrum, dict) or set(noise_spectrum) != {"low_to_high",
                                                                        "falloff_A"}:
        raise InputError(f"simulate.noise_spectrum: expected 'white' or {{low_to_high: R, "
                         f"falloff_A: F}}, got {noise_spectrum!r}")
    ratio, falloff = float(noise_spectrum["low_to_high"]), float(noise_spectrum["falloff_A"])
    if not (ratio > 0 and falloff > 0):
        raise InputError(f"simulate.noise_spectrum: low_to_high and falloff_A must be > 0, got "
                         f"{noise_spectrum!r}")
    return ratio, falloff


def noise_power(box: int, pixel_size: float, noise_spectrum="white") -> np.ndarray:
    """The simulator's noise power spectrum on the centred ``box x box`` Fourier grid, mean 1.

    White noise is flat. A coloured spectrum ``{low_to_high: r, falloff_A: f}`` has the shape
    ``P(k) = 1 + (r - 1) exp(-(k f)^2)`` (``k`` in 1/A), so the power at zero frequency is ``r``
    times the power at high frequency (ice and detector make real noise several times stronger
    at low frequency), the excess having fallen to 1/e at ``k = 1/f``. It is divided by its mean
    over the grid, so with unitary transforms (Parseval) the noise's variance per pixel is the
    same as white noise of the same sigma.

    Returns
    -------
    numpy.ndarray
        float64 ``(box, box)``, index ``[ky + box // 2, kx + box // 2]``.
    """
    shape = _spectrum_shape(noise_spectrum)
    if shape is None:
        return np.ones((box, box))
    ratio, falloff = shape
    k = (np.arange(box) - box // 2) / (box * pixel_size)
    s = np.hypot(*np.meshgrid(k, k, indexing="ij"))
    power = 1.0 + (ratio - 1.0) * np.exp(-((s * falloff) ** 2))
    return power / power.mean()


def _clean_images(spectrum, box, pixel_size, params, rows, ctf_kwargs, extraction="periodic"):
    if extraction == "cropped":
        block = max(1, tunables.SIM_CROPPED_BYTES_AT_ONCE // (16 * (2 * box) ** 2))
        if len(rows) > block:  # images are independent: blocks give the same numbers
            return np.concatenate([
                _clean_images(spectrum, box, pixel_size, params, rows[i:i + block], ctf_kwargs,
                              extraction) for i in range(0, len(rows), block)])
    rot = euler_to_matrix(params["rot"][rows], params["tilt"][rows], params["psi"][rows])
    spectra = project_ft(np.empty((box,) * 3, np.float32), rot, spectrum)
    shifts = np.stack([params["shift_x"][rows], params["shift_y"][rows]], axis=1) / pixel_size
    lo = 0
    if extraction == "cropped":
        # The particle sits in a patch twice the box (zero outside its projection), is shifted
        # and CTF-modulated there, and the central box is cut out as a picker would: what moves
        # or is delocalised past the edge is lost instead of wrapping round to the other side.
        padded_box = 2 * box
        lo = padded_box // 2 - box // 2
        patch = np.zeros((len(rows), padded_box, padded_box), dtype=np.float32)
        patch[:, lo:lo + box, lo:lo + box] = ift2(spectra)
        spectra = ft2(patch)
        box_out, box = box, padded_box
    k = (np.arange(box) - box // 2) / (box * pixel_size)
    fy, fx = np.meshgrid(k, k, indexing="ij")
    ctf = evaluate_ctf(fx, fy, params["defocus_u"][rows], params["defocus_v"][rows],
                       params["defocus_angle"][rows], **ctf_kwargs)
    # Single precision from here on: the images are stored as float32 anyway.
    spectra = spectra.astype(np.complex64)
    spectra *= shift_phase(box, shifts).astype(np.complex64)
    spectra *= ctf
    images = ift2(spectra)
    if extraction == "cropped":
        images = np.ascontiguousarray(images[:, lo:lo + box_out, lo:lo + box_out])
    return images


def _signal_images(spectra, box, pixel_size, params, rows, kinds, ctf_kwargs, extraction):
    """Noise-free images of ``rows``: the map's, the other map's, or zeros (pure-noise junk)."""
    kind = kinds[rows]
    if not kind.any():
        return _clean_images(spectra[JUNK_NONE], box, pixel_size, params, rows, ctf_kwargs,
                             extraction)
    images = np.zeros((len(rows), box, box), dtype=np.float32)
    for value in (JUNK_NONE, JUNK_OTHER):
        these = kind == value
        if these.any():
            images[these] = _clean_images(spectra[value], box, pixel_size, params, rows[these],
                                          ctf_kwargs, extraction)
    return images


def _junk_kinds(n_particles, junk_fraction, junk_kind, seed) -> np.ndarray:
    """What each row is (``JUNK_*``): ``round(junk_fraction * n)`` junk rows at random places.

    Drawn from their own stream so that the particles' poses, CTFs and noise do not depend on
    the junk settings.
    """
    if not 0 <= junk_fraction < 1:
        raise InputError(f"simulate.junk_fraction: must be in [0, 1), got {junk_fraction}")
    if junk_kind not in JUNK_KINDS:
        raise InputError(f"simulate.junk_kind: must be one of {', '.join(JUNK_KINDS)}, got "
                         f"{junk_kind!r}")
    kinds = np.full(n_particles, JUNK_NONE, dtype=np.int64)
    n_junk = round(junk_fraction * n_particles)
    chosen = np.random.default_rng([seed, 11]).permutation(n_particles)[:n_junk]
    if junk_kind == "noise":
        kinds[chosen] = JUNK_NOISE
    elif junk_kind == "other_map":
        kinds[chosen] = JUNK_OTHER
    else:
        kinds[chosen[: n_junk // 2]] = JUNK_NOISE
        kinds[chosen[n_junk // 2:]] = JUNK_OTHER
    return kinds


def _defoci(rng, n_particles, defocus_range_A, astigmatism_A, n_micrographs, defocus_spread_A):
    """``(defocus_u, defocus_v, angle, micrograph index or None)`` per particle."""
    if n_micrographs is None:
        defocus = rng.uniform(*defocus_range_A, n_particles)
        astig = rng.uniform(0, astigmatism_A, n_particles)
        return defocus + astig / 2, defocus - astig / 2, rng.uniform(0, 180, n_particles), None
    if not 1 <= int(n_micrographs) <= n_particles:
        raise InputError(f"simulate.n_micrographs: must be between 1 and n_particles "
                         f"({n_particles}), got {n_micrographs}")
    m = int(n_micrographs)
    # Consecutive rows share a micrograph, as in a STAR file written micrograph by micrograph.
    micrograph = np.arange(n_particles) * m // n_particles
    defocus = rng.uniform(*defocus_range_A, m)[micrograph]
    astig = rng.uniform(0, astigmatism_A, m)[micrograph]
    angle = rng.uniform(0, 180, m)[micrograph]
    # Particles at different heights in the ice.
    defocus = defocus + defocus_spread_A * rng.standard_normal(n_particles)
    return defocus + astig / 2, defocus - astig / 2, angle, micrograph


def simulate_chunks(volume: np.ndarray, pixel_size: float, n_particles: int, snr: float = 0.05,
                    defocus_range_A=(10000.0, 30000.0), astigmatism_A: float = 500.0,
                    voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.1,
                    shift_sigma_A: float = 3.0, seed: int = 0, chunk_size: int = 1000, *,
                    noise_spectrum="white", bfactor_A2: float = 0.0,
                    n_micrographs: int | None = None, defocus_spread_A: float = 0.0,
                    extraction: str = "periodic", junk_fraction: float = 0.0,
                    junk_kind: str = "mixed", junk_volume: np.ndarray | None = None):
    """Simulate particle images in chunks: ``(images (m, N, N) float32, RELION table)`` each.

    Every particle gets a uniform random rotation, a Gaussian origin (``shift_sigma_A``), a
    defocus uniform in ``defocus_range_A`` (its own, or its micrograph's) with astigmatism up to
    ``astigmatism_A`` at a random angle, RELION's CTF times an optional B-factor envelope, and
    Gaussian noise, white or coloured (``noise_spectrum``).

    **SNR.** The noise level is set once for the data set so that ``snr`` = (mean over the
    first 200 particles of the variance of the clean, CTF- and envelope-applied, shifted image
    of the map over the pixels inside the inscribed circle of radius N/2) / (variance of the
    noise per pixel, in real space). Coloured noise has the same per-pixel variance as white
    noise of that sigma (its spectrum has mean 1, :func:`noise_power`), so it only moves power
    between frequencies; an envelope lowers the signal variance and hence the noise sigma.

    The same seed gives the same particles whatever the chunk size: all parameters are drawn up
    front and each particle's white noise has its own stream ``default_rng([seed, 7, index])``
    (filtered per image for coloured noise). With every keyword after ``chunk_size`` at its
    default the output is bit for bit what it was before they existed.

    Parameters
    ----------
    volume : (N, N, N) float array, ``[z, y, x]``
        Ground-truth density.
    pixel_size : float
        Angstrom per pixel.
    n_particles : int
        Number of images.
    snr : float
        Signal variance / noise variance, as defined above (the paper's 0.05 by default).
    defocus_range_A : (float, float)
        Mean defocus drawn uniformly in this range, Angstrom (positive = underfocus).
    astigmatism_A : float
        ``rlnDefocusU - rlnDefocusV`` drawn uniformly in [0, astigmatism_A], Angstrom; the angle
        is uniform in [0, 180) degrees.
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction (RELION optics).
    shift_sigma_A : float
        Standard deviation of each origin component, Angstrom (not truncated).
    seed : int
        Seed of everything.
    chunk_size : int
        Images per yielded chunk.
    noise_spectrum : 'white' or dict
        ``{"low_to_high": r, "falloff_A": f}`` for coloured noise (:func:`noise_power`).
    bfactor_A2 : float
        Envelope ``exp(-B s^2 / 4)`` on the CTF's amplitude (RELION's ``rlnCtfBfactor``
        convention; ``exp(-B s^2 / 2)`` in power). It is in the images only: the STAR file
        carries no ``rlnCtfBfactor``, as a CTF estimate does not, so the reconstruction meets
        the decay unaware, as with real data.
    n_micrographs : int, optional
        None: every particle draws its own defocus. An integer M: consecutive particles are
        split into M micrographs (``rlnMicrographName`` ``micNNNNNN.mrc``), each drawing one
        defocus, astigmatism and angle, every particle then adding its own height offset.
    defocus_spread_A : float
        Standard deviation of that per-particle offset within a micrograph, Angstrom.
    extraction : 'periodic' or 'cropped'
        'periodic': shift and CTF act on the box itself, so whatever a large shift or the
        CTF's delocalisation (~ lambda * defocus * k, ~100 A at 3 um and 6 A) pushes past an
        edge comes back in at the opposite edge, as the reconstruction's own model assumes.
        'cropped': the particle is shifted and CTF-modulated in a patch twice the box and the
        central box is cut out, as when particles are extracted from a micrograph: that signal
        is lost instead (dearer: the patch has four times the pixels).
    junk_fraction : float
        Fraction of rows (rounded, at random places) that are not particles of ``volume``;
        they are flagged in the table's ``cryodaySimJunk`` column (:data:`JUNK_COLUMN`: 0
        particle, 1 pure noise, 2 another map), written only when ``junk_fraction > 0``. Their
        pose and CTF columns are the ones drawn for the row: for another map's projection, its
        true pose in that map's frame; for pure noise, meaningless.
    junk_kind : 'noise', 'other_map' or 'mixed'
        What junk is; 'mixed' makes half of it (rounded down) noise and the rest another map.
    junk_volume : (N, N, N) array, optional
        The other map (default :func:`cryoday.molecule.other_molecule`), scaled so that its
        images have the same mean variance as the map's: junk is told apart by shape, not by
        contrast.

    Yields
    ------
    images : (m, N, N) float32
        ``ift2(CTF * ft2(P shifted by -origin)) + noise``, protein bright (RELION's CTF sign).
    table : pandas.DataFrame
        RELION 3.1 particle columns for these images (angles in degrees, origins in A, defocus
        in A, ``rlnOpticsGroup`` = 1, and ``rlnMicrographName`` / ``cryodaySimJunk`` as above);
        pair with :func:`optics_table`.
    """
    box = volume.shape[0]
    if extraction not in EXTRACTIONS:
        raise InputError(f"simulate.extraction: must be one of {', '.join(EXTRACTIONS)}, got "
                         f"{extraction!r}")
    if bfactor_A2 < 0:
        raise InputError(f"simulate.bfactor_A2: must be >= 0, got {bfactor_A2}")
    shape = _spectrum_shape(noise_spectrum)
    rng = np.random.default_rng(seed)
    params = random_poses(n_particles, rng, shift_sigma_A)
    (params["defocus_u"], params["defocus_v"], params["defocus_angle"],
     micrograph) = _defoci(rng, n_particles, defocus_range_A, astigmatism_A, n_micrographs,
                           defocus_spread_A)
    kinds = _junk_kinds(n_particles, junk_fraction, junk_kind, seed)
    ctf_kwargs = {"voltage": voltage, "cs": cs, "amplitude_contrast": amplitude_contrast,
                  "bfactor": bfactor_A2}
    spectra = {JUNK_NONE: padded_spectrum(volume)}

    calibration = np.arange(min(n_particles, 200))
    k = np.arange(box) - box // 2
    inside = np.hypot(*np.meshgrid(k, k, indexing="ij")) < box / 2

    def mean_variance(spectrum):
        clean = _clean_images(spectrum, box, pixel_size, params, calibration, ctf_kwargs,
                              extraction)
        return clean[:, inside].var(axis=1).mean()

    signal_var = mean_variance(spectra[JUNK_NONE])
    noise_sigma = float(np.sqrt(signal_var / snr))
    if (kinds == JUNK_OTHER).any():
        if junk_volume is None:
            from cryoday.molecule import other_molecule

            junk_volume = other_molecule(box, pixel_size, seed=seed)
        if junk_volume.shape != volume.shape:
            raise InputError(f"simulate.junk_source: the other map is {junk_volume.shape[0]} px, "
                             f"the map {box} px")
        other = padded_spectrum(junk_volume)
        spectra[JUNK_OTHER] = other * np.float32(np.sqrt(signal_var / mean_variance(other)))
    # sqrt(P) on numpy's rfft2 layout (P is radial, so the filtered noise stays real).
    gain = None
    if shape is not None:
        power = np.fft.ifftshift(noise_power(box, pixel_size, noise_spectrum))
        gain = np.sqrt(power[:, : box // 2 + 1]).astype(np.float32)

    for start in range(0, n_particles, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n_particles))
        images = _signal_images(spectra, box, pixel_size, params, rows, kinds, ctf_kwargs,
                                extraction)
        noise = np.empty((len(rows), box, box))
        for j, row in enumerate(rows):
            np.random.default_rng([seed, 7, int(row)]).standard_normal(out=noise[j])
        if gain is not None:
            noise = sfft.irfft2(sfft.rfft2(noise.astype(np.float32), norm="ortho") * gain,
                                s=(box, box), norm="ortho")
        images += noise_sigma * noise
        table = pd.DataFrame({
            "rlnAngleRot": params["rot"][rows], "rlnAngleTilt": params["tilt"][rows],
            "rlnAnglePsi": params["psi"][rows],
            "rlnOriginXAngst": params["shift_x"][rows], "rlnOriginYAngst": params["shift_y"][rows],
            "rlnDefocusU": params["defocus_u"][rows], "rlnDefocusV": params["defocus_v"][rows],
            "rlnDefocusAngle": params["defocus_angle"][rows],
            "rlnOpticsGroup": np.ones(len(rows), dtype=int),
        })
        if micrograph is not None:
            table["rlnMicrographName"] = [f"mic{m + 1:06d}.mrc" for m in micrograph[rows]]
        if junk_fraction > 0:
            table[JUNK_COLUMN] = kinds[rows]
        yield images.astype(np.float32), table


def _density(source: str, key: str, box: int, pixel_size: float, seed: int,
             source_pixel_size: float | None = None) -> np.ndarray:
    """The density a ``simulate.<key>`` value names, on the simulation's grid.

    ``source`` is ``synthetic``, ``synthetic-other``, an atomic model (``.pdb``, ``.cif``,
    ``.mmcif``, ``.ent``, rendered at twice the pixel size) or a map (resampled; its header's
    voxel size, else ``source_pixel_size``).
    """
    # Imported here, not at the top: the generative model above needs no file I/O.
    import logging
    from pathlib import Path

    from cryoday import io, molecule
    from cryoday.fourier import rescale_volume

    log = logging.getLogger(__name__)
    if source == "synthetic":
        density = molecule.synthetic_molecule(box, pixel_size, seed=seed)
        log.info("%s: built-in synthetic molecule, %d px at %.3f A/px", key, box, pixel_size)
    elif source == "synthetic-other":
        density = molecule.other_molecule(box, pixel_size, seed=seed)
        log.info("%s: built-in second (elongated) molecule, %d px at %.3f A/px", key, box,
                 pixel_size)
    elif Path(source).suffix.lower() in {".pdb", ".cif", ".mmcif", ".ent"}:
        density = molecule.density_from_model(source, box, pixel_size,
                                              resolution_A=2 * pixel_size)
        log.info("%s: density of atomic model %s, %d px at %.3f A/px", key, source, box,
                 pixel_size)
    else:
        volume, voxel_size = io.read_map(source)
        voxel_size = voxel_size or source_pixel_size
        if not voxel_size:
            raise InputError(
                f"{source}: the map header gives no voxel size; set simulate.source_pixel_size"
            )
        density = rescale_volume(volume, voxel_size, box, pixel_size)
        log.info("%s: map %s (%d px at %.3f A/px) resampled to %d px at %.3f A/px",
                 key, source, volume.shape[0], voxel_size, box, pixel_size)
    # A map that is non-negative up to interpolation ringing is clipped to a density.
    return density.clip(min=0) if density.min() >= -1e-3 * density.max() else density


def symmetric_assembly(box: int, pixel_size: float, name: str, seed: int = 0) -> np.ndarray:
    """A test molecule of point group ``name`` (RELION's axes): ``|G|`` copies of a small
    built-in synthetic molecule (``0.4 x box`` across, so 0.24 box in diameter) placed off every
    axis and averaged over the group, like a GroEL ring pair for D7.

    The subunit is rendered at ``pixel_size`` (its pseudo-residues as wide in A as the full-size
    molecule's), centred at ``(0.2, 0, 0)`` box from the centre for ``Cn``, ``(0.2, 0, 0.13)``
    for ``Dn`` (the two-fold along x puts its copy at -z: two rings), and 0.25 box along a
    direction off every axis for T, O and I. float32, maximum 1.
    """
    from cryoday import molecule, symmetry

    name = symmetry.canonical_name(name)
    sub_box = max(16, round(0.4 * box) // 2 * 2)
    subunit = molecule.synthetic_molecule(sub_box, pixel_size, seed=seed)
    if name[0] == "C":
        offset = np.array([0.2, 0.0, 0.0]) * box
    elif name[0] == "D":
        offset = np.array([0.2, 0.0, 0.13]) * box
    else:
        direction = np.array([0.5, 0.3, 0.81])
        offset = 0.25 * box * direction / np.linalg.norm(direction)
    x, y, z = (round(float(o)) for o in offset)
    lo = np.array([z, y, x]) + box // 2 - sub_box // 2
    placed = np.zeros((box, box, box), np.float32)
    placed[lo[0]:lo[0] + sub_box, lo[1]:lo[1] + sub_box, lo[2]:lo[2] + sub_box] = subunit
    assembly = symmetry.symmetrise(placed, name).clip(min=0)
    return (assembly / assembly.max()).astype(np.float32)


def simulate_dataset(params: dict, star_out, stack_out, truth_out) -> None:
    """Simulate the particle set one ``simulate:`` block of the config describes, to files.

    The ``simulate`` rule's whole job: the ground-truth density from ``params["source"]``, the
    images by :func:`simulate_chunks` streamed into the stack, their RELION table (image names
    pointing at the stack beside it, the :data:`JUNK_COLUMN` when there is junk) and the truth.

    Parameters
    ----------
    params : dict
        The dataset's ``simulate`` block, defaults filled in by the config schema: ``source``,
        ``box``, ``pixel_size``, ``n_particles``, ``snr``, ``seed``, ``defocus_range_A``,
        ``astigmatism_A``, ``voltage_kV``, ``cs_mm``, ``amplitude_contrast``, ``shift_sigma_A``,
        and optionally ``source_pixel_size``, ``noise_spectrum``, ``bfactor_A2``,
        ``n_micrographs``, ``defocus_spread_A``, ``extraction``, ``junk_fraction``,
        ``junk_kind``, ``junk_source`` (meanings in :func:`simulate_chunks` and the schema), and
        ``symmetry`` (a point group: the ``synthetic`` source becomes
        :func:`symmetric_assembly`, any other source is symmetrised).
    star_out, stack_out, truth_out : str or Path
        The particles' STAR file, their ``.mrcs`` stack (beside the STAR file, as its image
        names say) and the ground-truth map; each written atomically.

    Raises
    ------
    InputError
        A source that cannot be read or a setting out of range, naming the ``simulate`` key.
    """
    import logging
    from pathlib import Path

    from cryoday import io

    log = logging.getLogger(__name__)
    box, pixel_size = int(params["box"]), float(params["pixel_size"])
    seed = int(params["seed"])
    source_pixel_size = params.get("source_pixel_size")
    group = params.get("symmetry", "C1")
    if group.strip().upper() != "C1" and params["source"] == "synthetic":
        truth = symmetric_assembly(box, pixel_size, group, seed)
        log.info("source: built-in synthetic assembly of point group %s, %d px at %.3f A/px",
                 group, box, pixel_size)
    else:
        truth = _density(params["source"], "source", box, pixel_size, seed, source_pixel_size)
        if group.strip().upper() != "C1":
            from cryoday import symmetry

            # A map or model is taken to have its axes on RELION's already: symmetrising it
            # makes it exactly symmetric about them.
            truth = symmetry.symmetrise(truth, group).clip(min=0)
            log.info("source symmetrised with point group %s", group)
    junk_fraction = float(params.get("junk_fraction", 0.0))
    junk_kind = params.get("junk_kind", "mixed")
    junk_volume = None
    if junk_fraction > 0 and junk_kind != "noise":
        junk_volume = _density(params.get("junk_source", "synthetic-other"), "junk_source", box,
                               pixel_size, seed, source_pixel_size)
    n_micrographs = params.get("n_micrographs")
    n = int(params["n_particles"])
    voltage, cs = float(params["voltage_kV"]), float(params["cs_mm"])
    amplitude_contrast = float(params["amplitude_contrast"])
    tables = []
    with io.StackWriter(stack_out, n, box, pixel_size) as writer:
        start = 0
        for images, table in simulate_chunks(
            truth, pixel_size, n,
            snr=float(params["snr"]),
            defocus_range_A=tuple(params["defocus_range_A"]),
            astigmatism_A=float(params["astigmatism_A"]),
            voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast,
            shift_sigma_A=float(params["shift_sigma_A"]),
            seed=seed,
            noise_spectrum=params.get("noise_spectrum", "white"),
            bfactor_A2=float(params.get("bfactor_A2", 0.0)),
            n_micrographs=None if n_micrographs is None else int(n_micrographs),
            defocus_spread_A=float(params.get("defocus_spread_A", 0.0)),
            extraction=params.get("extraction", "periodic"),
            junk_fraction=junk_fraction, junk_kind=junk_kind, junk_volume=junk_volume,
        ):
            writer.data[start : start + len(images)] = images
            start += len(images)
            tables.append(table)
            log.info("simulated %d / %d particles", start, n)

    table = pd.concat(tables, ignore_index=True)
    if JUNK_COLUMN in table:
        counts = table[JUNK_COLUMN].value_counts()
        log.info("junk rows (column %s): %d pure noise, %d another map's projections",
                 JUNK_COLUMN, counts.get(JUNK_NOISE, 0), counts.get(JUNK_OTHER, 0))
    stack_name = Path(stack_out).name
    table["rlnImageName"] = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
    io.write_particles(star_out, table, optics_table(pixel_size, box, voltage, cs,
                                                     amplitude_contrast))
    io.write_map(truth_out, truth, pixel_size)
    log.info("wrote %s, %s and %s", star_out, stack_out, truth_out)
