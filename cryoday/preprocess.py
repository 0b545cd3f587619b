"""Preprocessing of particle images: noise estimate, normalisation, contrast, held-out set, boxes.

:func:`preprocess_particles` is the pipeline's preprocessing step (the one place a user's
particle set is judged, through :func:`cryoday.io.read_particles`). The other functions work on
chunks of images so that a stack of any size streams through in bounded memory (``chunk_size``
images at a time); callers pass a ``read(rows)`` function (a memory-mapped
:class:`cryoday.io.ImageSource` in the pipeline, a numpy array's indexing in tests).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryoday import io, noise
from cryoday._preprocess_kernels import background_statistics, normalise_into
from cryoday.errors import InputError
from cryoday.fourier import crop_half_spectrum, fourier_crop_2d, half_spectrum

log = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826  # sigma of a Gaussian = 1.4826 * median absolute deviation


def radius_map(box: int) -> np.ndarray:
    """Distance in px of each pixel from the image centre ``box // 2``."""
    k = np.arange(box) - box // 2
    return np.hypot(*np.meshgrid(k, k, indexing="ij"))


def outer_mask(box: int, radius_px: float | None = None) -> np.ndarray:
    """Pixels outside the particle circle (default: the inscribed circle, radius box/2 - 1)."""
    radius = box / 2 - 1 if radius_px is None else radius_px
    mask = radius_map(box) > radius
    if mask.sum() < 16:
        raise ValueError(f"the particle circle of radius {radius} px leaves almost no background "
                         f"in a {box} px box")
    return mask


def estimate_noise(images: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image background median and robust noise sigma (1.4826 * MAD) over ``mask`` pixels.

    Returns float64 arrays ``(background, sigma)`` of shape ``(n,)``. The median and MAD ignore
    the odd bright neighbouring particle that a mean and standard deviation would not.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    n = len(images)
    background, deviation = np.empty(n), np.empty(n)
    background_statistics(images.reshape(n, -1), np.flatnonzero(np.asarray(mask).ravel()),
                          background, deviation)
    return background, MAD_TO_SIGMA * deviation


def normalise(images: np.ndarray, background, sigma, sign: int = 1) -> np.ndarray:
    """``sign * (images - background) / sigma`` per image, float32."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    n = len(images)
    out = np.empty(images.shape, dtype=np.float32)
    normalise_into(images.reshape(n, -1),
                   np.ascontiguousarray(np.broadcast_to(background, (n,)), dtype=np.float64),
                   np.ascontiguousarray(sign / np.broadcast_to(np.asarray(sigma, np.float64),
                                                               (n,))), out.reshape(n, -1))
    return out


@dataclass(frozen=True)
class Contrast:
    """Result of contrast detection: ``sign`` +1 when protein is bright (RELION), -1 when dark."""

    sign: int
    z_score: float
    n_used: int

    @property
    def decided(self) -> bool:
        """Whether the evidence is clear (|z| > 3); undecided data are kept as they are."""
        return abs(self.z_score) > 3.0


def detect_contrast(read: Callable[[np.ndarray], np.ndarray], n: int, box: int,
                    mask_radius: float | None = None, max_images: int = 5000,
                    chunk_size: int = 1000) -> Contrast:
    """Detect whether protein is bright or dark from the mean of the particle disc.

    In RELION's convention the CTF is positive at low frequency, so a bright-protein image has a
    central disc brighter than its background on average, however noisy each image is. The
    statistic is the disc-minus-background mean in units of the noise, averaged over up to
    ``max_images`` evenly spaced images; its z-score uses the spread across images.
    """
    rows = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(np.int64))
    mask = outer_mask(box, mask_radius)
    disc = radius_map(box) < 0.5 * (box / 2 if mask_radius is None else mask_radius)
    values = []
    for start in range(0, len(rows), chunk_size):
        images = read(rows[start:start + chunk_size])
        background, sigma = estimate_noise(images, mask)
        sigma = np.where(sigma > 0, sigma, 1.0)
        values.append((images[:, disc].mean(axis=1) - background) / sigma)
    values = np.concatenate(values)
    spread = values.std(ddof=1) if len(values) > 1 else np.inf
    z = float(values.mean() / (spread / np.sqrt(len(values)))) if spread > 0 else 0.0
    sign = -1 if z < -3.0 else 1
    return Contrast(sign=sign, z_score=z, n_used=len(values))


#: Fraction of its central value at which the excess power marks the particle's edge.
DIAMETER_EDGE_FRACTION = 0.05
#: The z-score below which the excess power inside the box is taken for noise.
DIAMETER_MIN_Z = 5.0


def estimate_particle_diameter(read: Callable[[np.ndarray], np.ndarray], n: int, box: int,
                               pixel_size: float, mask_radius: float | None = None,
                               max_images: int = 2000, edge_fraction: float = DIAMETER_EDGE_FRACTION,
                               min_z: float = DIAMETER_MIN_Z, chunk_size: int = 256
                               ) -> tuple[float, str]:
    """Estimate the particle's diameter from the radial profile of the images' mean power.

    Each of up to ``max_images`` evenly spaced images is normalised to zero background and unit
    noise outside ``mask_radius`` (as :func:`preprocess_stream` does); the mean of the squared
    pixels per integer radius, minus its level outside the mask, is the signal's variance: the
    particle's projections averaged over random in-plane orientations, hence circular. The edge
    is where it first falls, going outwards from its peak, below ``edge_fraction`` of the peak
    (linearly interpolated). The CTF spreads each image's signal outwards (by up to
    ``lambda * defocus * k`` at frequency ``k``), so the estimate is somewhat *larger* than the
    particle itself; for sizing a random start and masks that is the safe side.

    Parameters
    ----------
    read : callable
        ``read(rows) -> (m, box, box)`` images.
    n, box : int
        Number of images and their size in px.
    pixel_size : float
        A per px.
    mask_radius : float, optional
        Radius (px) of the circle outside which the noise is measured; default 0.95 x box / 2.
    max_images, edge_fraction, min_z, chunk_size
        Images used; the edge's fraction of the peak; the least z-score of the excess power
        inside the mask (over the images) that counts as signal; images per read.

    Returns
    -------
    diameter_A : float
        The estimate, at most the mask's diameter; without a clear signal (pure noise, or too
        few images), the default 0.6 x box.
    how : str
        One line saying how it was chosen (``"estimated: ..."`` or ``"default: ..."``).
    """
    mask_radius = 0.95 * box / 2 if mask_radius is None else float(mask_radius)
    default = 0.6 * box * pixel_size
    rows = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(np.int64))
    outside = outer_mask(box, mask_radius)
    inside = ~outside
    radius = radius_map(box)
    bins = np.rint(radius).astype(np.int64).ravel()
    n_bins = int(np.floor(mask_radius)) + 1  # rings wholly or partly inside the mask
    counts = np.bincount(bins, minlength=n_bins)[:n_bins]
    order = np.argsort(bins, kind="stable")
    # One more start than rings, so the last ring does not sum the corners beyond the mask.
    starts = np.searchsorted(bins[order], np.arange(n_bins + 1))
    profile = np.zeros(n_bins)
    excess = []  # per image: mean power inside the mask minus outside (the detection statistic)
    for start in range(0, len(rows), chunk_size):
        images = read(rows[start:start + chunk_size])
        background, sigma = estimate_noise(images, outside)
        sigma = np.where(sigma > 0, sigma, 1.0)
        power = normalise(images, background, sigma) ** 2
        level = power[:, outside].mean(axis=1)
        excess.append(power[:, inside].mean(axis=1) - level)
        flat = power.reshape(len(power), -1)[:, order] - level[:, None]
        profile += np.add.reduceat(flat, starts, axis=1)[:, :n_bins].sum(axis=0, dtype=np.float64)
    profile /= counts * len(rows)
    excess = np.concatenate(excess)
    spread = excess.std(ddof=1) if len(excess) > 1 else np.inf
    z = float(excess.mean() / (spread / np.sqrt(len(excess)))) if spread > 0 else 0.0
    if not z > min_z:
        return default, (f"default 0.6 x box = {default:.1f} A: no particle signal in the "
                         f"mean power of {len(rows)} images (z = {z:.1f} < {min_z:g})")
    # A 3-ring running mean steadies the profile's few-pixel inner rings.
    smooth = np.convolve(np.pad(profile, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    peak = int(np.argmax(smooth))
    threshold = edge_fraction * smooth[peak]
    below = np.flatnonzero(smooth[peak:] < threshold)
    if len(below) == 0:
        diameter = 2 * mask_radius * pixel_size
        return diameter, (f"estimated {diameter:.1f} A (the mask's diameter): the particles' "
                          f"power stays above {edge_fraction:.0%} of its centre to the mask "
                          f"radius {mask_radius:.1f} px in {len(rows)} images, so they fill "
                          "the box (or the noise is not flat)")
    edge = peak + int(below[0])
    inner = smooth[edge - 1]
    edge_px = edge - 1 + (inner - threshold) / (inner - smooth[edge]) if edge > 0 else 0.0
    diameter = 2 * edge_px * pixel_size
    return diameter, (f"estimated {diameter:.1f} A ({2 * edge_px / box:.2f} x box) from the mean "
                      f"power of {len(rows)} images (z = {z:.0f}): where it falls to "
                      f"{edge_fraction:.0%} of its centre; the CTF's delocalisation makes "
                      "this somewhat larger than the particle")


def choose_heldout(n: int, n_heldout: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of ``n_heldout`` particles never trained on (at most half of a small set)."""
    if n < 2:
        raise InputError(f"a particle set of {n} image(s) cannot be split into training and "
                         "held-out images")
    count = min(n_heldout, n // 2)
    if count < n_heldout:
        log.warning("only %d particles: holding out %d instead of %d", n, count, n_heldout)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=count, replace=False)] = True
    return mask


def check_heldout_disjoint(image_keys, heldout: np.ndarray) -> None:
    """Refuse a split in which an image is both held out and trained on.

    The held-out likelihood is the test that a map explains images it never saw; an image
    named twice (once in each set) voids it. :func:`cryoday.io.read_particles` refuses repeated
    images, so this guards the invariant, naming the rows, should another reader feed us.

    Parameters
    ----------
    image_keys : sequence of hashable
        One key per particle row identifying its image (e.g. ``(stack path, index)``).
    heldout : numpy.ndarray of bool
        The held-out mask, as :func:`choose_heldout` returns.
    """
    keys = np.asarray([str(k) for k in image_keys])
    heldout = np.asarray(heldout, dtype=bool)
    shared = np.isin(keys, keys[heldout]) & ~heldout
    if shared.any():
        row = int(np.flatnonzero(shared)[0])
        twin = int(np.flatnonzero(heldout & (keys == keys[row]))[0])
        raise InputError(f"particle rows {twin + 1} (held out) and {row + 1} (training) are the "
                         f"same image {keys[row]}; {int(shared.sum())} training rows repeat a "
                         "held-out image: keep each image once")


def stage_box(box: int, pixel_size: float, resolution_A: float) -> tuple[int, float]:
    """The even box a stage at ``resolution_A`` needs, and its pixel size.

    The stage uses Fourier coefficients up to radius ``r = box * pixel_size / resolution_A`` px
    (the same physical frequency in any box). The cropped box keeps a margin of 2 px beyond it
    (``r <= new_box / 2 - 2``) where the input box allows, so that interpolation near the cutoff
    does not touch the Nyquist ring. A stage at the data's Nyquist frequency itself is valid:
    its disc (``|k| < r``) stays inside the box, and the slices and turned images are read from
    zero-padded transforms. Never larger than the input box; odd input boxes give the largest
    even box below.
    """
    radius = box * pixel_size / resolution_A
    new_box = int(2 * np.ceil(radius + 2))
    new_box = min(new_box, box - box % 2)
    # The margin absorbs rounding: box * ps / (2 ps) can come out just above box / 2.
    if radius > new_box / 2 * (1 + 1e-9):
        raise InputError(
            f"a stage at {resolution_A} A needs Fourier radius {radius:.1f} px, beyond the "
            f"Nyquist frequency of {box} px images at {pixel_size} A/px "
            f"({2 * pixel_size:.2f} A); raise the stage resolution"
        )
    return new_box, box * pixel_size / new_box


def preprocess_stream(read, n: int, box: int, out, chunk_size: int = 1000, sign: int = 1,
                      mask_radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalise every image to zero background and unit noise, protein bright, into ``out``.

    Returns the per-image background and sigma (float64, in the input's units). Raises
    :class:`InputError` naming the particle row of a blank (constant) image.
    """
    mask = outer_mask(box, mask_radius)
    backgrounds = np.empty(n)
    sigmas = np.empty(n)
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n))
        images = read(rows)
        background, sigma = estimate_noise(images, mask)
        blank = ~(sigma > 0)
        if blank.any():
            row = int(rows[np.flatnonzero(blank)[0]])
            raise InputError(f"particle row {row + 1} has no noise outside the particle circle "
                             "(a blank or clipped image); remove it from the STAR file")
        out[rows[0]:rows[-1] + 1] = normalise(images, background, sigma, sign)
        backgrounds[rows], sigmas[rows] = background, sigma
        log.info("normalised %d / %d images", rows[-1] + 1, n)
    return backgrounds, sigmas


def downsample_stream(read, n: int, out, new_box: int, chunk_size: int = 1000) -> None:
    """Fourier-crop every image to ``new_box`` (mean-preserving) into ``out``."""
    for start in range(0, n, chunk_size):
        rows = np.arange(start, min(start + chunk_size, n))
        out[rows[0]:rows[-1] + 1] = fourier_crop_2d(read(rows), new_box)


def stage_stacks_stream(read, n: int, outs, new_boxes, chunk_size: int = 1000) -> None:
    """Fourier-crop every image to each of ``new_boxes`` in one pass over the stack.

    Each chunk of ``chunk_size`` images is read once and transformed once; every stage's crop
    comes from that one spectrum (a stage at the full box gets the images as they are). Each
    output equals :func:`downsample_stream` with its box, bit for bit, and memory stays at one
    chunk's images, spectrum and crops, whatever ``n`` and the number of stages.

    Parameters
    ----------
    read : callable
        ``read(rows) -> (m, box, box)`` float32 images.
    n : int
        Number of images.
    outs : sequence
        One writable ``(n, new_box, new_box)`` array per stage (``StackWriter.data`` in the
        pipeline), indexed by contiguous row slices.
    new_boxes : sequence of int
        Each stage's box (px), at most the images' (:func:`stage_box`).
    chunk_size : int
        Images per read.
    """
    outs, new_boxes = list(outs), [int(b) for b in new_boxes]
    if len(outs) != len(new_boxes):
        raise ValueError(f"{len(outs)} outputs for {len(new_boxes)} stage boxes")
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        images = np.asarray(read(np.arange(rows.start, rows.stop)), dtype=np.float32)
        box = images.shape[-1]
        if max(new_boxes, default=0) > box:
            raise ValueError(f"cannot Fourier-crop from {box} to a larger box {max(new_boxes)}")
        half = None
        for out, new_box in zip(outs, new_boxes):
            if new_box == box:
                out[rows] = images
                continue
            if half is None:
                half = half_spectrum(images)
            out[rows] = crop_half_spectrum(half, box, new_box)
        log.info("cropped %d / %d images to %d stage box(es)", rows.stop, n, len(new_boxes))


def stage_info(info: dict, resolution_A: float) -> dict:
    """A stage's ``stage{k}.json``: its box and pixel size, and what it inherits from the full
    box (preprocessing's ``info.json``, ``info``).

    Images were normalised to unit noise at the full box; mean-preserving cropping scales the
    per-pixel noise by ``new_box / box`` (``noise_sigma``).
    """
    box, pixel_size = info["box"], info["pixel_size"]
    new_box, new_pixel_size = stage_box(box, pixel_size, resolution_A)
    return {
        "resolution_A": resolution_A,
        "box": new_box,
        "pixel_size": new_pixel_size,
        "noise_sigma": new_box / box,
        "full_box": box,
        "full_pixel_size": pixel_size,
        "particle_diameter_A": info.get("particle_diameter_A"),  # for the random start
    }


def preprocess_particles(star, stack_out, star_out, info_out, references=(),
                         pixel_size: float | None = None, *, noise_out=None,
                         n_heldout: int = 100, heldout_seed: int = 0, contrast: str = "auto",
                         mask_radius_fraction: float = 0.95, chunk_size: int = 1000,
                         noise_model: str = "radial",
                         noise_micrograph_min_particles: int = noise.MIN_MICROGRAPH_PARTICLES
                         ) -> dict:
    """Validate a particle set, detect its contrast, normalise it and choose held-out images.

    The pipeline's ``preprocess`` step. Every check of the user's files happens before the
    first output is written (:func:`cryoday.io.read_particles`, the reference maps); the three
    outputs appear together or not at all.

    Parameters
    ----------
    star : path
        The user's particle STAR file.
    stack_out, star_out, info_out : path
        Normalised stack, its STAR file (original names in ``rlnImageOriginalName``, the
        held-out flag in ``cryodayHeldOut``, noise sigma in ``cryodayNoiseSigma``) and a JSON
        summary.
    references : sequence of path
        Reference maps to check now rather than after the reconstruction.
    pixel_size : float, optional
        Pixel size in A when the files have none.
    noise_out : path, optional
        The noise spectrum per group (:class:`cryoday.noise.NoiseSpectrum` TSV; flat for
        ``noise_model: white``); each particle's group is ``cryodayNoiseGroup`` (0-based
        column of the TSV after ``shell_invA``).
    n_heldout, heldout_seed, contrast, mask_radius_fraction, chunk_size, noise_model,
    noise_micrograph_min_particles
        The config's ``preprocess`` keys.

    Returns
    -------
    dict
        What ``info_out`` holds.

    Raises
    ------
    InputError
        For a bad particle set or reference, naming the file, column and row.
    """
    particles = io.read_particles(star, pixel_size=pixel_size)
    n, box, psize = len(particles.table), particles.box, particles.pixel_size
    log.info("%s: %d particles, %d px, %.4f A/px", star, n, box, psize)
    for reference in references:
        log.info(io.check_reference(reference, box, psize))
    heldout = choose_heldout(n, n_heldout, heldout_seed)
    check_heldout_disjoint(zip(particles.stack_paths, particles.stack_index), heldout)

    if noise_model not in noise.NOISE_MODELS:
        raise InputError(f"preprocess.noise_model is {noise_model!r}; use white or radial")
    mask_radius = mask_radius_fraction * box / 2
    groups, labels, parent = noise.noise_groups(
        particles.table, noise_micrograph_min_particles if noise_model == "radial" else 0)
    written = []
    try:
        with io.ImageSource(particles) as source:
            detected = detect_contrast(source.read, n, box, mask_radius=mask_radius)
            sign = _contrast_sign(contrast, detected)
            diameter, diameter_source = estimate_particle_diameter(
                source.read, n, box, psize, mask_radius=mask_radius)
            log.info("particle diameter: %s", diameter_source)
            with io.StackWriter(stack_out, n, box, psize) as writer:
                _, sigmas = preprocess_stream(source.read, n, box, writer.data,
                                              chunk_size=chunk_size, sign=sign,
                                              mask_radius=mask_radius)
        written.append(Path(stack_out))
        if noise_model == "radial":
            # From the normalised stack: unit noise, zero background, a radial shape only. Read
            # through read_rows, which lets go of the mapped pages: slicing the map kept them, and
            # a 200,000-particle job's resident memory grew to 10 GB.
            stack = io.open_stack(stack_out)
            spectrum = noise.estimate_spectra(
                lambda rows: io.read_rows(stack, rows), n, box, psize, groups,
                labels, parent, mask_radius, chunk_size, noise_micrograph_min_particles,
                max_per_group=noise.SAMPLE_PER_GROUP)
            del stack
            log.info("noise spectrum: %s", noise.summary(spectrum))
        else:
            spectrum = noise.NoiseSpectrum.white(box, psize, labels)
        if noise_out is not None:
            spectrum.save(noise_out)
            written.append(Path(noise_out))
        table = particles.table.copy()
        stack_name = Path(stack_out).name
        table["rlnImageOriginalName"] = particles.table["rlnImageName"]
        table["rlnImageName"] = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
        table["cryodayHeldOut"] = heldout.astype(int)
        table["cryodayNoiseSigma"] = sigmas
        table["cryodayNoiseGroup"] = groups
        table["rlnImagePixelSize"] = psize
        io.write_particles(star_out, table, particles.optics)
        written.append(Path(star_out))
        info = {
            "input_star": str(star),
            "n_particles": n,
            "n_heldout": int(heldout.sum()),
            "box": box,
            "pixel_size": psize,
            "contrast_sign": int(sign),
            "contrast_detected_sign": int(detected.sign),
            "contrast_z": float(detected.z_score),
            "noise_sigma_median": float(np.median(sigmas)),
            "mask_radius_px": float(mask_radius),
            "particle_diameter_A": float(diameter),
            "particle_diameter_source": diameter_source,
            "noise_model": noise_model,
            "noise_groups": len(labels),
        }
        with io.atomic_path(info_out) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=2))
    except BaseException:
        # Each file is written atomically; this keeps the set whole (no stack without its STAR).
        for path in written:
            path.unlink(missing_ok=True)
        raise
    log.info("normalised %d particles (median noise sigma %.4g); %d held out",
             n, info["noise_sigma_median"], info["n_heldout"])
    return info


def _contrast_sign(contrast: str, detected: Contrast) -> int:
    if contrast == "auto":
        if detected.sign < 0:
            log.warning(
                "particles are dark on a bright background (z = %.1f over %d images); "
                "inverting the contrast so protein is bright, as RELION expects",
                detected.z_score, detected.n_used,
            )
        else:
            log.info("particles are bright on dark (z = %.1f over %d images), as RELION expects",
                     detected.z_score, detected.n_used)
        return detected.sign
    if contrast not in ("keep", "invert"):
        raise InputError(f"preprocess.contrast is {contrast!r}; use auto, keep or invert")
    log.info("contrast forced by config: %s (detected sign %+d, z = %.1f)",
             contrast, detected.sign, detected.z_score)
    return -1 if contrast == "invert" else 1
