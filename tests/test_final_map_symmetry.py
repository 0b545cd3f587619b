"""The final map with a point group: every pose counted at its ``|G|`` equivalents ``A g``
(inserted once, the sums symmetrised; checked against inserting the equivalents one by one and
against a dense trilinear lookup); C1 as before."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import test_symmetry_reconstruct
from scipy import ndimage
from test_symmetry_reconstruct import BOX, GROUP, PSIZE, ctf_images
from workflow_helpers import REPO, write_config

from cryoday import final_map, simulate, symmetry
from cryoday._symmetrise_kernels import symmetrise_cubes
from cryoday.fsc import fsc
from cryoday.reconstruct import half_sets, insert_expanded, insert_symmetric, solve

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
    # equivalents, against reconstruct.insert_expanded expanding them all at once with one
    # image per pose.
    images, rotations, shifts, params = one_unit
    particles = half_sets(len(images))[0][:60]
    image = np.repeat(particles, 2)
    rng = np.random.default_rng(5)
    poses = rotations[image] @ symmetry.group("C2")[rng.integers(0, 2, len(image))]
    weights = rng.uniform(0.2, 1.0, len(image))
    read = images.__getitem__
    blocked = insert_expanded(read, len(image), poses, shifts[image], params, PSIZE, BOX,
                              GROUP, chunk_size=50, weights=weights, image=image,
                              block_poses=7 * 6)

    def read_pose(rows):  # the images are the poses here
        return images[image[rows]]

    ctf = {k: (v[image] if np.ndim(v) else v) for k, v in params.items()}
    whole = insert_expanded(read_pose, len(image), poses, shifts[image], ctf, PSIZE, BOX,
                            GROUP, chunk_size=50, weights=weights)
    # The same sums in another order: float32 accumulation (measured ~1e-6 of the largest
    # value), where a wrong block or a lost equivalent is of the order of the sums themselves.
    scale = np.abs(whole.num).max()
    assert np.abs(blocked.num - whole.num).max() < 1e-5 * scale
    assert np.abs(blocked.den - whole.den).max() < 1e-5 * whole.den.max()
    assert np.abs(whole.num).max() > 0


@pytest.mark.parametrize("group", ["D3", "O"])
def test_symmetrised_cubes_are_a_dense_trilinear_lookup(group):
    # A random Hermitian cube, small enough for scipy's interpolation at every voxel.
    half = 9
    m = 2 * half + 1
    rng = np.random.default_rng(3)
    raw = rng.standard_normal((m, m, m)) + 1j * rng.standard_normal((m, m, m))
    num = raw + np.conj(raw[::-1, ::-1, ::-1])
    den = rng.uniform(0, 1, (m, m, m))
    den = den + den[::-1, ::-1, ::-1]
    ops = symmetry.group(group)
    rmax = half - 1.5  # rotated points stay inside the cube: no edge convention enters
    num_out, den_out = np.empty_like(num), np.empty_like(den)
    symmetrise_cubes(num, den, np.ascontiguousarray(ops), float(half), rmax, num_out, den_out)

    z, y, x = np.indices((m, m, m)) - half
    p = np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(float)  # (x, y, z) per voxel
    inside = (p**2).sum(0) <= rmax**2
    want_num = np.zeros(m**3, complex)
    want_den = np.zeros(m**3)
    for g in ops:
        q = g @ p[:, inside] + half
        coords = q[::-1]  # the cube is indexed [z, y, x]
        look = [ndimage.map_coordinates(a, coords, order=1) for a in (num.real, num.imag, den)]
        want_num[inside] += look[0] + 1j * look[1]
        want_den[inside] += look[2]
    # Float64 sums of the same eight-corner terms in another order.
    assert np.allclose(num_out.ravel(), want_num, atol=1e-9)
    assert np.allclose(den_out.ravel(), want_den, atol=1e-9)
    assert np.abs(want_num).max() > 1  # and the lookup is not empty


def test_symmetrised_sums_give_the_map_of_the_expanded_insertion(one_unit, d3_truth):
    # Trilinear lookup of the sums against trilinear insertion at every equivalent: two
    # interpolations of the same data, which differ by a voxel's blur of the 2x oversampled
    # cube, most in the last shells (the cutoff's edge).
    images, rotations, shifts, params = one_unit
    read = images.__getitem__
    args = (read, len(images), rotations, shifts, params, PSIZE, BOX, GROUP)
    fast, slow = insert_symmetric(*args), insert_expanded(*args)
    fast_map, slow_map = solve(fast), solve(slow)
    assert np.corrcoef(fast_map.ravel(), slow_map.ravel())[0, 1] > 0.999
    freq, agreement = fsc(fast_map, slow_map, PSIZE)
    inner = (freq > 0) & (freq < 0.8 * freq.max())
    assert agreement[inner].min() > 0.99  # measured 0.993; 0.94 in the last shell
    # ... and the map is as close to the truth in every shell (measured: equal to 0.001 up
    # to 0.6 Nyquist, closer beyond).
    to_truth_fast = fsc(fast_map, d3_truth, PSIZE)[1]
    to_truth_slow = fsc(slow_map, d3_truth, PSIZE)[1]
    assert np.all(to_truth_fast > to_truth_slow - 0.005)
    # The same weight: the lookup neither loses nor doubles an equivalent's share.
    assert abs(fast.den.sum() / slow.den.sum() - 1) < 0.01  # measured 5e-5


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
