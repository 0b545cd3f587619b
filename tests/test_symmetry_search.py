"""Symmetry search on C1 maps (cryoday.symmetry_search): group, axes, scores, aligned map."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cryoday import io, molecule, simulate, symmetry
from cryoday.errors import InputError
from cryoday.symmetry_search import align_to_axes, find_symmetry

BOX, PSIZE = 48, 3.0


def _group_mismatch_deg(r_true, name_true, q_found, name_found):
    """Largest angle from an element of ``R G R^T`` to the nearest element of ``Q G' Q^T``:
    zero when the found axes are the true ones (whatever the labelling of the elements)."""
    a = np.einsum("ij,gjk,lk->gil", r_true, symmetry.group(name_true), r_true)
    b = np.einsum("ij,gjk,lk->gil", q_found, symmetry.group(name_found), q_found)
    traces = np.einsum("gij,hij->gh", a, b)
    return float(np.degrees(np.arccos(np.clip((traces.max(axis=1) - 1) / 2, -1, 1))).max())


@pytest.fixture(scope="module")
def off_centre_molecule():
    m = molecule.synthetic_molecule(BOX, PSIZE)
    # Off the axes, the copies form a ring (like GroEL's subunits) rather than one blob.
    return ndimage.shift(m, (BOX * 0.1, 0, BOX * 0.18), order=1)


@pytest.fixture(scope="module")
def d7_rotated(off_centre_molecule):
    d7 = symmetry.symmetrise(off_centre_molecule, "D7")
    r = simulate.random_rotations(1, np.random.default_rng(5))[0]
    return d7, r, symmetry.rotate_volume(d7, r, 3)


def test_auto_finds_d7_and_undoes_the_rotation(d7_rotated):
    _, r, turned = d7_rotated
    found = find_symmetry(turned, PSIZE, "auto")
    assert found.chosen.name == "D7"
    assert _group_mismatch_deg(r, "D7", found.chosen.rotation, "D7") < 2.0
    by_name = {c.name: c for c in found.candidates}
    # Its subgroups pass too; the choice is the largest group that does.
    assert by_name["C7"].consistency >= found.reference - found.tolerance
    assert by_name["D8"].consistency < found.reference - found.tolerance
    assert by_name["I"].score < by_name["D7"].score
    aligned = align_to_axes(turned, found)
    # On RELION's axes the aligned map is D7 about z and x: nearly its own symmetrised copy,
    # which the turned map is not.
    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert corr(aligned, symmetry.symmetrise(aligned, "D7", order=1)) > 0.98
    assert corr(turned, symmetry.symmetrise(turned, "D7", order=1)) < 0.9
    record = found.as_dict()
    assert record["group"] == "D7" and len(record["candidates"]) == 18


def test_trpv1_is_c4_about_z_and_found_after_a_random_rotation(shared_data):
    volume, voxel = io.read_map(shared_data / "cryojax" / "trpv1_volume.mrc")
    # The deposited map is C4 about z already (a quarter turn changes it by < 1e-7).
    quarter = symmetry.rotate_volume(volume, symmetry.axis_rotation([0, 0, 1], np.pi / 2), 1)
    assert np.corrcoef(quarter.ravel(), volume.ravel())[0, 1] > 0.9999
    r = simulate.random_rotations(1, np.random.default_rng(8))[0]
    found = find_symmetry(symmetry.rotate_volume(volume, r, 3), voxel, "auto")
    assert found.chosen.name == "C4"
    axis = found.chosen.rotation @ [0, 0, 1]
    assert np.degrees(np.arccos(min(1.0, abs(axis @ (r @ [0, 0, 1]))))) < 2.0


def test_asymmetric_molecule_is_c1(off_centre_molecule):
    r = simulate.random_rotations(1, np.random.default_rng(6))[0]
    found = find_symmetry(symmetry.rotate_volume(off_centre_molecule, r, 3), PSIZE, "auto")
    assert found.chosen.name == "C1"
    # Every candidate is clearly short of C1's self-consistency, not just barely.
    assert max(c.consistency for c in found.candidates[1:]) < found.reference - 0.15


def test_half_maps_give_cross_half_consistency_and_fsc(d7_rotated):
    d7, _, turned = d7_rotated
    rng = np.random.default_rng(9)
    noise = 0.15 * d7.std()
    halves = [turned + ndimage.gaussian_filter(rng.normal(0, noise * 4, turned.shape), 1.0)
              for _ in range(2)]
    found = find_symmetry(0.5 * (halves[0] + halves[1]), PSIZE, ["C7", "d7", "O"],
                          half1=halves[0], half2=halves[1])
    assert [c.name for c in found.candidates] == ["C1", "C7", "D7", "O"]
    assert found.chosen.name == "D7"
    assert found.reference < 0.999  # the halves' noise differs
    assert all(c.fsc_A is not None and np.isfinite(c.fsc_A) for c in found.candidates)
    by_name = {c.name: c for c in found.candidates}
    # Averaging over the true group removes noise: the symmetrised halves agree further out.
    assert by_name["D7"].fsc_A <= by_name["C1"].fsc_A


def test_bad_arguments():
    v = np.zeros((16, 16, 16), np.float32)
    with pytest.raises(InputError, match="'Q3'"):
        find_symmetry(v, 1.0, "Q3")
    with pytest.raises(InputError, match="both half maps"):
        find_symmetry(v, 1.0, "C2", half1=v)
