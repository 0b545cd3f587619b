"""The noise spectrum in the report (a plot per group) and in metrics.json (its summary)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from test_verdicts import (
    PIXEL,
    particles,  # noqa: F401 (a fixture: the synthetic run's particles)
    write_run,
)

from cryoday import noise, report, validation


def coloured(shells, low_to_high, falloff_A=30.0):
    return 1 + (low_to_high - 1) * np.exp(-(shells * falloff_A) ** 2)


def write_spectrum(path, box, pixel_size, n_micrographs, rng):
    """Two optics groups (4:1 and 2:1) and ``n_micrographs`` perturbed copies of the first."""
    shells = np.arange(noise.n_shells(box)) / (box * pixel_size)
    power = [coloured(shells, 4.0), coloured(shells, 2.0)]
    labels = ["optics 1", "optics 2"]
    for m in range(n_micrographs):
        power.append(power[0] * rng.uniform(0.8, 1.2, len(shells)))
        labels.append(f"optics 1 / mic{m:04d}.mrc")
    noise.NoiseSpectrum(shells, np.array(power), tuple(labels)).save(path)
    return shells


def test_metrics_ratio_is_the_pooled_band_means(tmp_path, rng):
    # 64 px at 2 A: shell j at j / 128 1/A, Nyquist shell 32 (1/4 A). Below 1/30 A: shells 1-4;
    # from 1/10 A to Nyquist: shells 13-32. Pooled: the two optics groups' mean.
    path = tmp_path / "noise_spectrum.tsv"
    shells = write_spectrum(path, 64, 2.0, 30, rng)
    assert shells[4] < 1 / 30 < shells[5] and shells[12] < 1 / 10 < shells[13]
    pooled = (coloured(shells, 4.0) + coloured(shells, 2.0)) / 2
    expected = pooled[1:5].mean() / pooled[13:33].mean()
    figures = validation.noise_model_figures(path)
    assert figures["groups"] == 32
    assert figures["low_to_high"] == pytest.approx(expected, rel=1e-5)  # the TSV's 6 digits
    assert 2.0 < figures["low_to_high"] < 3.0  # between the two groups: 4:1 and 2:1 at k = 0


def test_metrics_ratio_uses_nyquist_when_it_is_coarser_than_10_A(tmp_path, rng):
    # 32 px at 6 A: Nyquist (shell 16) is 1/12 A, so the high band is that shell alone.
    path = tmp_path / "noise_spectrum.tsv"
    shells = write_spectrum(path, 32, 6.0, 0, rng)
    pooled = (coloured(shells, 4.0) + coloured(shells, 2.0)) / 2
    low = shells[1:] < 1 / 30
    expected = pooled[1:][low].mean() / pooled[16]
    assert validation.noise_model_figures(path) == {
        "groups": 2, "low_to_high": pytest.approx(expected, rel=1e-5)}


def test_white_spectrum_has_ratio_one(tmp_path):
    path = tmp_path / "noise_spectrum.tsv"
    noise.NoiseSpectrum.white(48, 3.0).save(path)
    assert validation.noise_model_figures(path) == {"groups": 1, "low_to_high": 1.0}


def test_report_shows_the_spectrum_as_an_embedded_png(tmp_path, rng):
    path = tmp_path / "noise_spectrum.tsv"
    write_spectrum(path, 64, 2.0, 30, rng)
    page = report.noise_spectrum_plot(path)
    match = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="noise power spectrum">',
                      page)
    assert match
    assert base64.b64decode(match.group(1)).startswith(b"\x89PNG")
    ratio = validation.noise_model_figures(path)["low_to_high"]
    assert "32 groups (2 optics, 30 micrographs)" in page
    assert f"{ratio:.2f} x" in page


def test_a_run_records_the_noise_model_and_reports_its_plot(particles, tmp_path, rng):  # noqa: F811
    # A small synthetic finished run (test_verdicts' 32 px, 100 particles at their true poses):
    # run_metrics records the figures, and the report page embeds the plot under Inputs.
    args = write_run(tmp_path / "run", particles, final_map=particles["truth"],
                     seed_maps={1: particles["truth"]})
    path = tmp_path / "noise_spectrum.tsv"
    write_spectrum(path, 32, PIXEL, 3, rng)
    metrics, table = validation.run_metrics(**args, noise_spectrum=path)
    assert metrics["noise_model"] == validation.noise_model_figures(path)
    metrics_path, fsc_path = tmp_path / "metrics.json", tmp_path / "fsc.tsv"
    metrics_path.write_text(json.dumps(metrics))
    validation.write_fsc_table(fsc_path, table)
    page_path = tmp_path / "report.html"
    report.write_report(
        page_path, dataset="test", metrics=metrics_path, fsc=fsc_path,
        volume=args["final_volume"], star=args["final_star"],
        preprocess_info=args["preprocess_info"], preprocessed_star=args["preprocessed_star"],
        seed_stages=args["seed_stages"], settings={}, n_example_particles=2,
        noise_spectrum=path)
    page = page_path.read_text()
    inputs = page[page.index("<h2>Inputs</h2>"):page.index("<h2>Run</h2>")]
    assert '<img src="data:image/png;base64,' in inputs
    assert 'alt="noise power spectrum"' in inputs
    assert "5 groups (2 optics, 3 micrographs)" in inputs

