"""The final map: full-box half maps from the particles' poses, their FSC, the Guinier B factor
and the sharpened map."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryoday import final_map, io, molecule, simulate
from cryoday.fourier import ft3, ift3, radial_index_3d
from cryoday.fsc import fsc, resolution_at
from cryoday.geometry import euler_to_matrix, matrix_to_euler
from cryoday.importance.store import K_JOINT, K_STORED, PosteriorStore
from cryoday.reconstruct import reconstruct

BOX, PSIZE, N = 32, 4.0, 1200
STAGE_A = 20.0  # a stage cutoff the final map must beat (Nyquist is 8 A)


@pytest.fixture(scope="module")
def simulated():
    truth = molecule.synthetic_molecule(BOX, PSIZE)
    images, tables = [], []
    for chunk, table in simulate.simulate_chunks(truth, PSIZE, N, snr=0.5, seed=3):
        images.append(chunk)
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    rotations = euler_to_matrix(table.rlnAngleRot.values, table.rlnAngleTilt.values,
                                table.rlnAnglePsi.values)
    shifts = np.stack([table.rlnOriginXAngst.values, table.rlnOriginYAngst.values], 1) / PSIZE
    ctf = {"defocus_u": table.rlnDefocusU.values, "defocus_v": table.rlnDefocusV.values,
           "defocus_angle": table.rlnDefocusAngle.values, "voltage": 300.0, "cs": 2.7,
           "amplitude_contrast": 0.1}
    return truth, np.concatenate(images), rotations, shifts, ctf, table


@pytest.fixture(scope="module")
def result(simulated):
    _, images, rotations, shifts, ctf, _ = simulated
    return final_map.final_reconstruction(lambda r: images[r], N, rotations, shifts, ctf, PSIZE,
                                          BOX, chunk_size=300, log=lambda *_: None)


def test_half_maps_resolve_beyond_a_stage_cutoff(result, simulated):
    truth = simulated[0]
    assert np.isfinite(result.resolution_A) and result.resolution_A < STAGE_A
    assert np.isfinite(result.resolution_unmasked_A)
    # The full map beats the same particles reconstructed only to the stage's cutoff.
    _, images, rotations, shifts, ctf, _ = simulated
    stage = reconstruct(lambda r: images[r], N, rotations, shifts, ctf, PSIZE, BOX,
                        max_resolution_A=STAGE_A)
    freq, curve = fsc(result.full, truth, PSIZE)
    freq, stage_curve = fsc(stage, truth, PSIZE)
    assert resolution_at(freq, curve, 0.5) < resolution_at(freq, stage_curve, 0.5) - 2.0
    assert result.poses == "best" and result.n_insertions == N


def test_full_map_from_all_sums_is_as_good_as_the_halves_average(result, simulated):
    truth = simulated[0]
    average = 0.5 * (result.half1 + result.half2)
    np.testing.assert_allclose(result.full, average, atol=0.2 * np.abs(average).max())
    freq, pooled = fsc(result.full, truth, PSIZE)
    _, plain = fsc(average, truth, PSIZE)
    signal = freq <= 1 / result.resolution_A
    assert np.all(pooled[signal] > plain[signal] - 0.01)


def _blurred_noise(b_factor, box=64, pixel_size=2.0, seed=0):
    """A map with a flat amplitude spectrum times the envelope exp(-B s^2 / 4)."""
    rng = np.random.default_rng(seed)
    spectrum = ft3(rng.standard_normal((box, box, box)))
    flat = spectrum / np.maximum(np.abs(spectrum), 1e-12)
    s = radial_index_3d(box) / (box * pixel_size)
    return ift3(flat * np.exp(-b_factor * s * s / 4))


@pytest.mark.parametrize("b_factor", [50.0, 150.0])
def test_guinier_recovers_a_known_b_factor(b_factor):
    volume = _blurred_noise(b_factor)
    estimate = final_map.guinier_bfactor(volume, 2.0, 10.0, 4.5)
    assert estimate == pytest.approx(b_factor, abs=15.0)
    # The sharpened map with that B and a perfect FSC has the flat spectrum back.
    freq, _ = final_map.shell_amplitudes(volume, 2.0)
    sharp = final_map.sharpen(volume, 2.0, estimate, freq, np.ones(len(freq)), 4.0)
    assert abs(final_map.guinier_bfactor(sharp, 2.0, 10.0, 4.5)) < 15.0


def test_guinier_needs_three_shells():
    assert np.isnan(final_map.guinier_bfactor(_blurred_noise(50.0), 2.0, 10.0, 9.5))


def test_posterior_poses_weight_the_stored_marginals():
    store = PosteriorStore(2)
    rot = euler_to_matrix(np.array([10.0, 200.0]), np.array([30.0, 100.0]), 0.0)
    store.dir_xyz[:, 0] = rot[:, 2]
    store.dir_xyz[:, 1] = -rot[:, 2]
    store.inp_angle[:, :2] = [[0.5, 1.0], [2.0, 3.0]]
    store.shift_A[:, 0] = [[4.0, -8.0], [0.0, 2.0]]
    log = np.log
    store.dir_logp[:, :2] = log([[0.75, 0.25], [1.0, 1e-30]])
    store.inp_logp[:, :2] = log([[0.5, 0.5], [0.9, 0.1]])
    store.shift_logp[:, 0] = 0.0
    store.has[:] = True
    image, rotations, shifts, weights = final_map.posterior_poses(store.state(), 2.0, (3, 3, 2),
                                                                  min_weight=0.0)
    # Only finite masses become poses: 2 x 2 x 1 for each particle.
    assert np.bincount(image).tolist() == [4, 4]
    np.testing.assert_allclose(np.bincount(image, weights), 1.0)
    first = image == 0
    np.testing.assert_allclose(sorted(weights[first]), [0.125, 0.125, 0.375, 0.375])
    np.testing.assert_allclose(shifts[first], [[2.0, -4.0]] * 4)
    # The heaviest pose of particle 0 has the stored direction and in-plane angle.
    best = np.flatnonzero(first)[np.argmax(weights[first])]
    _, _, p = matrix_to_euler(rotations[best][None])
    np.testing.assert_allclose(rotations[best][2], rot[0, 2], atol=1e-6)
    assert p[0] % 360 == pytest.approx(np.degrees(0.5), abs=1e-3) or \
        p[0] % 360 == pytest.approx(np.degrees(1.0), abs=1e-3)
    assert K_STORED >= 3


def test_posterior_poses_drop_negligible_poses_and_renormalise():
    # Particle 0: directions 0.9995 / 0.0005; particle 1: 0.6 / 0.4 (one in-plane, one shift).
    store = PosteriorStore(2)
    rot = euler_to_matrix(np.array([10.0, 200.0]), np.array([30.0, 100.0]), 0.0)
    store.dir_xyz[:, 0] = rot[:, 2]
    store.dir_xyz[:, 1] = -rot[:, 2]
    store.dir_logp[:, :2] = np.log([[0.9995, 0.0005], [0.6, 0.4]])
    store.inp_logp[:, 0] = 0.0
    store.shift_logp[:, 0] = 0.0
    store.has[:] = True
    every = final_map.posterior_poses(store.state(), 2.0, (3, 3, 2), min_weight=0.0)
    assert np.bincount(every[0]).tolist() == [2, 2]
    image, rotations, _, weights = final_map.posterior_poses(store.state(), 2.0, (3, 3, 2))
    assert final_map.POSE_WEIGHT_FLOOR > 0.0005
    assert np.bincount(image).tolist() == [1, 2]
    np.testing.assert_allclose(np.bincount(image, weights), 1.0)
    np.testing.assert_allclose(rotations[image == 0][0][2], rot[0, 2], atol=1e-6)
    np.testing.assert_allclose(sorted(weights[image == 1]), [0.4, 0.6])


def test_posterior_poses_take_the_joint_rotations_where_stored():
    """Particle 0's posterior holds two views, each at its own in-plane angle: its joint
    rotations give those two poses (times its one shift), where the product of its marginals
    gives four, two of them pairs it never had. Particle 1 has no joint rotations (a state from
    before they were kept) and gets the product."""
    store = PosteriorStore(2)
    rot = euler_to_matrix(np.array([10.0, 200.0]), np.array([30.0, 100.0]), 0.0)
    for particle in range(2):
        store.dir_xyz[particle, :2] = rot[:, 2]
        store.inp_angle[particle, :2] = [0.5, 2.0]
        store.dir_logp[particle, :2] = store.inp_logp[particle, :2] = np.log([0.6, 0.4])
        store.shift_A[particle, 0] = [4.0, -8.0]
        store.shift_logp[particle, 0] = 0.0
    store.joint_dir_xyz[0, :2] = rot[:, 2]
    store.joint_inp_angle[0, :2] = [0.5, 2.0]
    # Shares of the whole rotation posterior: the rest (5%) lay beyond the stored points.
    store.joint_logp[0, :2] = np.log([0.57, 0.38])
    store.has[:] = True
    image, rotations, shifts, weights = final_map.posterior_poses(store.state(), 2.0, (3, 3, 2),
                                                                  min_weight=0.0)
    assert image.tolist() == [0, 0, 1, 1, 1, 1]
    np.testing.assert_allclose(weights[:2], [0.6, 0.4])
    np.testing.assert_allclose(sorted(weights[2:]), [0.16, 0.24, 0.24, 0.36])
    np.testing.assert_allclose(shifts, [[2.0, -4.0]] * 6)
    # Each joint pose is its view with its own in-plane angle.
    for pose, view, psi in ((0, 0, 0.5), (1, 1, 2.0)):
        np.testing.assert_allclose(rotations[pose][2], rot[view, 2], atol=1e-6)
        rot_deg, tilt_deg, _ = matrix_to_euler(rot[view][None])
        want = euler_to_matrix(rot_deg, tilt_deg, np.array([np.degrees(psi)]))[0]
        np.testing.assert_allclose(rotations[pose], want, atol=1e-5)
    product = final_map.posterior_poses(store.state(), 2.0, (3, 3, 2), min_weight=0.0,
                                        joint=False)
    assert np.bincount(product[0]).tolist() == [4, 4]
    assert K_JOINT >= 2


def test_posterior_poses_in_blocks_equal_one_block(monkeypatch):
    rng = np.random.default_rng(3)
    store = PosteriorStore(7)
    for dim in range(3):
        logp = np.log(rng.dirichlet(np.ones(K_STORED), size=7)).astype(np.float32)
        store.log_masses(dim)[:] = logp
    v = rng.standard_normal((7, K_STORED, 3))
    store.dir_xyz[:] = v / np.linalg.norm(v, axis=2, keepdims=True)
    store.inp_angle[:] = rng.uniform(0, 2 * np.pi, (7, K_STORED))
    store.shift_A[:] = rng.normal(0, 3, (7, K_STORED, 2))
    # Joint rotations for some particles only, so that blocks mix the two kinds of poses.
    v = rng.standard_normal((7, K_JOINT, 3))
    store.joint_dir_xyz[:] = v / np.linalg.norm(v, axis=2, keepdims=True)
    store.joint_inp_angle[:] = rng.uniform(0, 2 * np.pi, (7, K_JOINT))
    store.joint_logp[[0, 2, 5, 6]] = np.log(rng.dirichlet(np.ones(K_JOINT), size=4))
    store.has[:] = True
    whole = final_map.posterior_poses(store.state(), 1.5)
    monkeypatch.setattr(final_map, "POSE_BLOCK", 3)  # blocks of 3, 3 and 1 particles
    blocks = final_map.posterior_poses(store.state(), 1.5)
    for a, b in zip(whole, blocks):
        np.testing.assert_array_equal(a, b)
    assert len(np.unique(whole[0])) == 7


def test_posterior_insertion_at_a_delta_posterior_is_the_best_pose_map(simulated):
    _, images, rotations, shifts, ctf, _ = simulated
    n = 200
    image = np.repeat(np.arange(n), 2)
    weights = np.tile([1.0, 0.0], n)
    kw = {"chunk_size": 150, "log": lambda *_: None}
    delta = final_map.final_reconstruction(lambda r: images[r], n, rotations[:n], shifts[:n],
                                           ctf, PSIZE, BOX, **kw)
    # Each particle twice: at its pose with all the mass, and at a wrong one with none.
    wrong = np.repeat(rotations[:n], 2, axis=0)
    wrong[1::2] = rotations[n:2 * n]
    spread = final_map.final_reconstruction(lambda r: images[r], n, wrong,
                                            np.repeat(shifts[:n], 2, axis=0), ctf, PSIZE, BOX,
                                            image=image, weights=weights, **kw)
    assert spread.poses == "posterior" and spread.n_insertions == 2 * n
    np.testing.assert_allclose(spread.full, delta.full, atol=1e-4 * np.abs(delta.full).max())


def _written_set(directory, simulated):
    """The simulated set as a STAR file and stack in ``directory``."""
    images, table = simulated[1], simulated[5]
    with io.StackWriter(directory / "p.mrcs", N, BOX, PSIZE) as writer:
        writer.data[:] = images
    table = table.copy()
    table["rlnImageName"] = [f"{i + 1:06d}@p.mrcs" for i in range(N)]
    io.write_particles(directory / "p.star", table, simulate.optics_table(PSIZE, BOX, 300.0, 2.7,
                                                                          0.1))
    return directory / "p.star"


def _outputs(directory):
    directory.mkdir()
    return {name: directory / file for name, file in (
        ("full", "map_full.mrc"), ("half1", "half1.mrc"), ("half2", "half2.mrc"),
        ("sharpened", "map_sharpened.mrc"), ("figures", "final_map.json"),
        ("fsc_table", "final_map_fsc.tsv"))}


def test_run_writes_every_output_atomically(tmp_path, simulated):
    star = _written_set(tmp_path, simulated)
    outputs = _outputs(tmp_path / "final")
    figures = final_map.run(preprocessed_star=star, final_star=star, outputs=outputs,
                            log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == sorted(
        p.name for p in outputs.values())  # no temporary files left beside them
    for name in ("full", "half1", "half2", "sharpened"):
        with mrcfile.open(outputs[name]) as mrc:
            assert mrc.data.shape == (BOX,) * 3
            assert float(mrc.voxel_size.x) == pytest.approx(PSIZE)
    written = json.loads(outputs["figures"].read_text())
    assert written == json.loads(json.dumps(figures))
    assert written["halfmap_fsc0143_masked_A"] < STAGE_A
    # 8 A Nyquist leaves the 10 A Guinier range too few shells: no B, the map only filtered.
    assert written["guinier_B_A2"] is None and written["sharpening_B_A2"] is None
    fsc_rows = pd.read_csv(outputs["fsc_table"], sep="\t")
    assert list(fsc_rows.columns) == ["freq_invA", "resolution_A", "fsc_unmasked", "fsc_masked"]
    assert len(fsc_rows) == BOX // 2 + 1


@pytest.mark.parametrize("posterior, classes", [(False, False), (True, False), (False, True)],
                         ids=["best poses", "posterior poses", "class-weighted best poses"])
def test_shards_add_up_to_the_one_job_map(tmp_path, simulated, posterior, classes):
    """Three shards' half sums (rule final_map_shard), added up by the final map, give the map
    one job makes, to single precision (the shards' sums are stored in it); with K classes each
    particle weighted by its main-class posterior."""
    star = _written_set(tmp_path, simulated)
    state = None
    weighting = {}
    if classes:
        weighting = {"class_weights": np.random.default_rng(5).uniform(0.2, 1.0, N),
                     "main_class": 1}
    if posterior:
        # Each particle's stored marginals: its true direction and a neighbour, two in-plane
        # angles, one shift.
        rotations, shifts_px = simulated[2], simulated[3]
        rot, tilt, psi = matrix_to_euler(rotations)
        store = PosteriorStore(N)
        store.dir_xyz[:, 0] = rotations[:, 2]
        store.dir_xyz[:, 1] = euler_to_matrix(rot + 2.0, tilt + 2.0, psi)[:, 2]
        store.inp_angle[:, 0] = np.radians(psi)
        store.inp_angle[:, 1] = np.radians(psi + 3.0)
        store.shift_A[:, 0] = shifts_px * PSIZE
        store.dir_logp[:, :2] = np.log([0.7, 0.3])
        store.inp_logp[:, :2] = np.log([0.6, 0.4])
        store.shift_logp[:, 0] = 0.0
        store.has[:] = True
        state = tmp_path / "state.npz"
        np.savez(state, **store.state())
    quiet = {"log": lambda *_: None, **weighting}
    one = final_map.run(preprocessed_star=star, final_star=star, state=state,
                        outputs=_outputs(tmp_path / "one"), **quiet)
    parts = []
    for shard in range(3):
        parts.append(tmp_path / f"shard{shard}.npz")
        halves = final_map.run_shard(preprocessed_star=star, final_star=star, state=state,
                                     shard=shard, n_shards=3, out=parts[-1], **quiet)
        assert halves.poses == ("posterior" if posterior or classes else "best")
    sharded = final_map.run(preprocessed_star=star, final_star=star, state=state,
                            outputs=_outputs(tmp_path / "sharded"), shard_sums=parts, **quiet)
    for key in ("poses", "n_particles", "n_insertions", "box", "pixel_size"):
        assert sharded[key] == one[key], key
    for key in ("halfmap_fsc0143_masked_A", "halfmap_fsc0143_unmasked_A",
                "halfmap_fsc05_masked_A"):
        assert sharded[key] == pytest.approx(one[key], rel=1e-6), key
    for name in ("full", "half1", "half2", "sharpened"):
        a, b = (mrcfile.read(tmp_path / d / f"{name if 'half' in name else 'map_' + name}.mrc")
                for d in ("one", "sharded"))
        np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max())
    assert one["n_insertions"] == (4 * N if posterior else N)


def test_shard_rows_cover_every_particle_once():
    rows = [final_map.shard_rows(10, s, 3) for s in range(3)]
    assert np.array_equal(np.concatenate(rows), np.arange(10))
    assert [len(r) for r in rows] == [4, 3, 3]
    with pytest.raises(ValueError):
        final_map.shard_rows(10, 3, 3)
