"""Preprocessing against independent references and known statistics."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cryoday import preprocess
from cryoday.ctf import evaluate_ctf
from cryoday.errors import InputError
from cryoday.fourier import ft2, ift2


def blob_images(rng, n, box, sign=1, snr=0.05, pixel_size=4.0):
    """Projections of a Gaussian blob with CTF (RELION sign) and white noise at ``snr``."""
    r = preprocess.radius_map(box)
    clean = np.exp(-(r**2) / (2 * (box / 8) ** 2))
    k = np.arange(box) - box // 2
    ky, kx = np.meshgrid(k, k, indexing="ij")
    defocus = rng.uniform(10000, 30000, n)
    ctf = evaluate_ctf(kx / (box * pixel_size), ky / (box * pixel_size), defocus, defocus, 0.0,
                       300.0, 2.7, 0.1)
    signal = ift2(ctf * ft2(clean)[None])
    signal *= np.sqrt(snr) / signal.std()
    return (sign * signal + rng.standard_normal((n, box, box))).astype(np.float32)


def test_noise_estimate_on_pure_noise(rng):
    images = 3.0 + 2.0 * rng.standard_normal((50, 64, 64)).astype(np.float32)
    mask = preprocess.outer_mask(64)
    background, sigma = preprocess.estimate_noise(images, mask)
    n_px = mask.sum()
    # MAD-based sigma has ~1.65x the variance of the sample std: allow 5 of its standard errors.
    assert np.abs(sigma - 2.0).max() < 5 * 2.0 * np.sqrt(1.65 / (2 * n_px))
    assert np.abs(background - 3.0).max() < 5 * 2.0 * 1.25 / np.sqrt(n_px)


def test_noise_estimate_ignores_the_particle(rng):
    images = rng.standard_normal((20, 64, 64)).astype(np.float32)
    images[:, preprocess.radius_map(64) < 25] += 50.0
    _, sigma = preprocess.estimate_noise(images, preprocess.outer_mask(64))
    assert np.allclose(sigma, 1.0, atol=0.15)


def test_normalisation(rng):
    images = 5.0 + 3.0 * rng.standard_normal((10, 32, 32)).astype(np.float32)
    mask = preprocess.outer_mask(32)
    out = preprocess.normalise(images, *preprocess.estimate_noise(images, mask))
    background, sigma = preprocess.estimate_noise(out, mask)
    assert np.allclose(background, 0, atol=1e-5) and np.allclose(sigma, 1, atol=1e-5)


@pytest.mark.parametrize("sign", [1, -1])
def test_contrast_is_detected_at_low_snr_with_ctf(rng, sign):
    images = blob_images(rng, 400, 48, sign=sign)
    result = preprocess.detect_contrast(lambda rows: images[rows], len(images), 48)
    assert result.sign == sign and result.decided


def test_contrast_on_pure_noise_is_undecided(rng):
    images = rng.standard_normal((400, 48, 48)).astype(np.float32)
    result = preprocess.detect_contrast(lambda rows: images[rows], len(images), 48)
    assert not result.decided and result.sign == 1


def test_heldout_choice(capsys):
    a = preprocess.choose_heldout(1000, 100, seed=3)
    assert a.sum() == 100 and np.array_equal(a, preprocess.choose_heldout(1000, 100, seed=3))
    assert not np.array_equal(a, preprocess.choose_heldout(1000, 100, seed=4))
    assert preprocess.choose_heldout(10, 100).sum() == 5
    with pytest.raises(InputError):
        preprocess.choose_heldout(1, 1)


@pytest.mark.parametrize(("box", "psize", "res"), [(64, 3.0, 40), (64, 3.0, 10), (128, 2.8, 10),
                                                   (65, 5.0, 15), (200, 1.4, 40)])
def test_stage_box(box, psize, res):
    new_box, new_psize = preprocess.stage_box(box, psize, res)
    assert new_box % 2 == 0 and new_box <= box
    assert new_box * new_psize == pytest.approx(box * psize)
    radius = box * psize / res
    assert radius <= new_box / 2 - 1  # the stage's frequencies are below the new Nyquist
    assert 2 * new_psize < res


def test_stage_beyond_nyquist_is_refused_and_at_nyquist_accepted():
    with pytest.raises(InputError, match="Nyquist"):
        preprocess.stage_box(64, 3.0, 5.9)
    # Exactly Nyquist (6 A at 3 A/px) keeps the whole box: the disc |k| < 32 fits in it.
    assert preprocess.stage_box(64, 3.0, 6.0) == (64, 3.0)


def test_downsampling_keeps_low_frequencies(rng):
    images = rng.standard_normal((5, 64, 64)).astype(np.float32)
    out = np.empty((5, 24, 24), dtype=np.float32)
    preprocess.downsample_stream(lambda rows: images[rows], 5, out, 24, chunk_size=2)
    full = np.fft.fftshift(np.fft.fft2(images), axes=(1, 2))
    small = np.fft.fftshift(np.fft.fft2(out), axes=(1, 2))
    # numpy's unnormalised FFT: coefficients scale with the pixel count; values keep local means.
    ratio = (24 * 24) / (64 * 64)
    assert np.allclose(small[:, 8:16, 8:16], full[:, 28:36, 28:36] * ratio, atol=1e-3)
    assert np.allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1e-5)


def test_streaming_equals_one_shot(rng):
    images = (2 + rng.standard_normal((25, 32, 32))).astype(np.float32)
    out = np.empty_like(images)
    preprocess.preprocess_stream(lambda rows: images[rows], 25, 32, out, chunk_size=7, sign=-1)
    mask = preprocess.outer_mask(32)
    direct = preprocess.normalise(images, *preprocess.estimate_noise(images, mask), sign=-1)
    assert np.array_equal(out, direct)


def test_blank_image_is_refused_by_row(rng):
    images = rng.standard_normal((6, 32, 32)).astype(np.float32)
    images[4] = 0.0
    with pytest.raises(InputError, match="particle row 5"):
        preprocess.preprocess_stream(lambda rows: images[rows], 6, 32, np.empty_like(images))


def test_streaming_memory_is_bounded_by_the_chunk(tmp_path, rng):
    n, box, chunk = 4000, 128, 250
    source = np.lib.format.open_memmap(tmp_path / "in.npy", "w+", np.float32, (n, box, box))
    source[:] = 1.0 + rng.standard_normal((1, box, box)).astype(np.float32)
    source.flush()
    out = np.lib.format.open_memmap(tmp_path / "out.npy", "w+", np.float32, (n, box, box))
    tracemalloc.start()
    preprocess.preprocess_stream(lambda rows: np.asarray(source[rows]), n, box, out,
                                 chunk_size=chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = n * box * box * 4
    assert peak < 12 * chunk * box * box * 4 < whole, f"peak {peak / 1e6:.0f} MB"


def test_the_preprocessing_step_is_the_streaming_functions_composed(shared_data, tmp_path):
    """preprocess_particles writes what its parts compute: the normalised stack, the held-out
    choice of choose_heldout, the noise sigmas; and refuses a bad contrast option by name."""
    import json
    import shutil

    from cryoday import io

    shutil.copy(shared_data / "cryojax/trpv1_small_stack.mrcs", tmp_path / "batch_0_restacked.mrc")
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.star", tmp_path / "particles.star")
    out = tmp_path / "out"
    info = preprocess.preprocess_particles(
        tmp_path / "particles.star", out / "p.mrcs", out / "p.star", out / "info.json",
        n_heldout=3, heldout_seed=5, contrast="invert", chunk_size=4)
    particles = io.read_particles(tmp_path / "particles.star")
    with io.ImageSource(particles) as source:
        images = source.read(np.arange(10))
    expected = np.empty_like(images)
    preprocess.preprocess_stream(lambda rows: images[rows], 10, 48, expected, sign=-1,
                                 mask_radius=0.95 * 24)
    assert np.array_equal(io.open_stack(out / "p.mrcs"), expected)
    written = io.read_particles(out / "p.star")
    assert np.array_equal(written.table["cryodayHeldOut"].to_numpy().astype(bool),
                          preprocess.choose_heldout(10, 3, seed=5))
    assert json.loads((out / "info.json").read_text()) == info
    assert info["contrast_sign"] == -1 and info["n_heldout"] == 3
    # The diameter recorded is the estimator's on the same images (10 only: z decides).
    assert (info["particle_diameter_A"], info["particle_diameter_source"]) == \
        preprocess.estimate_particle_diameter(lambda rows: images[rows], 10, 48,
                                              particles.pixel_size, mask_radius=0.95 * 24)
    with pytest.raises(InputError, match="preprocess.contrast is 'flip'"):
        preprocess.preprocess_particles(
            tmp_path / "particles.star", tmp_path / "o2/p.mrcs", tmp_path / "o2/p.star",
            tmp_path / "o2/info.json", contrast="flip")
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())


def test_the_preprocessing_step_estimates_the_spectrum_from_its_sample(shared_data, tmp_path,
                                                                         monkeypatch):
    """With more particles in a group than the spectrum's sample, the step reads the sampled
    rows of the normalised stack (not the range between the first and the last), and the
    spectrum agrees with one from every particle."""
    import shutil

    from cryoday import io, noise

    shutil.copy(shared_data / "cryojax/trpv1_small_stack.mrcs", tmp_path / "batch_0_restacked.mrc")
    shutil.copy(shared_data / "cryojax/trpv1_small_stack.star", tmp_path / "particles.star")
    spectra = {}
    for name, cap in (("all", 10_000), ("sample", 4)):
        monkeypatch.setattr(noise, "SAMPLE_PER_GROUP", cap)
        out = tmp_path / name
        preprocess.preprocess_particles(
            tmp_path / "particles.star", out / "p.mrcs", out / "p.star", out / "info.json",
            n_heldout=3, contrast="invert", chunk_size=4, noise_out=out / "noise.tsv")
        spectra[name] = noise.NoiseSpectrum.load(out / "noise.tsv").power[0]
    assert not np.array_equal(spectra["sample"], spectra["all"])  # it did read fewer images
    # The same estimate from the sampled rows of the normalised stack, read one by one.
    stack = io.open_stack(tmp_path / "sample" / "p.mrcs")
    rows = noise.sampled_rows(np.zeros(10, np.int64), 1, 4)
    assert len(rows) == 4 and rows[-1] == 9
    expected = noise.estimate_spectra(lambda r: np.stack([stack[i] for i in r]), 10, 48,
                                      stack_pixel_size(tmp_path), np.zeros(10, np.int64),
                                      ("optics 1",), [0], 0.95 * 24, max_per_group=4)
    np.testing.assert_allclose(spectra["sample"], expected.power[0], rtol=1e-4)


def stack_pixel_size(folder):
    from cryoday import io

    return io.read_particles(folder / "particles.star").pixel_size
