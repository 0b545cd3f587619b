"""The final map with a point group: every pose inserted at its ``|G|`` equivalents ``A g``,
a block of poses at a time; C1 as before."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import test_symmetry_reconstruct
from test_symmetry_reconstruct import BOX, GROUP, PSIZE, ctf_images
from workflow_helpers import REPO, write_config

from cryoday import final_map, simulate, symmetry
from cryoday.fsc import fsc
from cryoday.reconstruct import half_sets, insert_symmetric

d3_truth = test_symmetry_reconstruct.d3_truth  # the D3 map, shared with the reconstruct tests


@pytest.fixture(scope="module")
def one_unit(d3_truth):
    """Noise-free CTF-modulated projections of the D3 map at views from one asymmetric unit."""
    rng = np.random.default_rng(2)
    candidates = simulate.random_rotations(6000, rng)
    rotations = candidates[symmetry.in_asymmetric_unit(candidates[:, 2], GROUP)][:400]
    images, shifts, params = ctf_images(d3_truth, rotations, rng)
    return images, rotations, shifts, params


def _final(one_unit, **kwargs):
    images, rotations, shifts, params = one_unit
    return final_map.final_reconstruction(images.__getitem__, len(images), rotations, shifts,
                                          params, PSIZE, BOX, log=lambda *_: None, **kwargs)


def test_one_asymmetric_unit_of_views_gives_a_better_final_map_with_the_group(one_unit,
                                                                              d3_truth):
    plain = _final(one_unit)
    sym = _final(one_unit, symmetry="d3")

    def misfit(v):
        return 1 - np.corrcoef(v.ravel(), d3_truth.ravel())[0, 1]

    # A sixth of the sphere's views leave gaps in Fourier space; their equivalents fill them.
    assert misfit(sym.full) < 0.01
    assert misfit(sym.full) < 0.3 * misfit(plain.full)
    assert fsc(sym.full, d3_truth, PSIZE)[1].mean() > fsc(plain.full, d3_truth, PSIZE)[1].mean()
    # The half maps agree better too (each half fills its gaps the same way).
    assert sym.fsc_masked.mean() > plain.fsc_masked.mean()
    # The map comes out symmetric about RELION's axes.
    assert np.corrcoef(sym.full.ravel(),
                       symmetry.symmetrise(sym.full, GROUP).ravel())[0, 1] > 0.999
    n = len(one_unit[0])
    assert sym.n_insertions == 6 * n and plain.n_insertions == n
    assert sym.figures()["symmetry"] == "D3" and sym.poses == "best"
    assert "symmetry" not in plain.figures()  # C1's figures are those it had


def test_c1_is_the_default_bit_for_bit(one_unit):
    default, c1 = _final(one_unit), _final(one_unit, symmetry="C1")
    for name in ("full", "half1", "half2", "sharpened"):
        assert np.array_equal(getattr(default, name), getattr(c1, name))


def test_blocks_of_expanded_poses_sum_to_the_whole_expansion(one_unit):
    # Two weighted poses per particle (a posterior's), expanded in blocks of 7 poses' worth of
    # equivalents, against reconstruct.insert_symmetric expanding them all at once with one
    # image per pose.
    images, rotations, shifts, params = one_unit
    particles = half_sets(len(images))[0][:60]
    image = np.repeat(particles, 2)
    rng = np.random.default_rng(5)
    poses = rotations[image] @ symmetry.group("C2")[rng.integers(0, 2, len(image))]
    weights = rng.uniform(0.2, 1.0, len(image))
    read = images.__getitem__
    blocked = insert_symmetric(read, len(image), poses, shifts[image], params, PSIZE, BOX,
                               GROUP, chunk_size=50, weights=weights, image=image,
                               block_poses=7 * 6)

    def read_pose(rows):  # insert_symmetric's images are the poses
        return images[image[rows]]

    ctf = {k: (v[image] if np.ndim(v) else v) for k, v in params.items()}
    whole = insert_symmetric(read_pose, len(image), poses, shifts[image], ctf, PSIZE, BOX,
                             GROUP, chunk_size=50, weights=weights)
    # The same sums in another order: float32 accumulation (measured ~1e-6 of the largest
    # value), where a wrong block or a lost equivalent is of the order of the sums themselves.
    scale = np.abs(whole.num).max()
    assert np.abs(blocked.num - whole.num).max() < 1e-5 * scale
    assert np.abs(blocked.den - whole.den).max() < 1e-5 * whole.den.max()
    assert np.abs(whole.num).max() > 0


def test_the_final_map_rule_passes_the_trained_group(tmp_path):
    config = {"datasets": {"a": {"simulate": {"box": 16}}, "b": {"simulate": {"box": 16},
                                                                  "symmetry": "d7"},
                           "c": {"simulate": {"box": 16}, "symmetry": "auto"}},
              "reconstruction": {"stages_A": [30], "seeds": [1], "symmetry": "C4"}}
    write_config(tmp_path, config)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from _common import "
            "mock_snakemake as m; print(json.dumps([m('final_map', dataset=d).params.symmetry "
            "for d in 'abc']))")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The dataset's own group, else the section's; 'auto' trains in C1.
    assert json.loads(proc.stdout.splitlines()[-1]) == ["C4", "d7", "C1"]
