"""Compile the reconstruction's Numba kernels before the first stage needs them.

A fresh install compiles every kernel on first use: 77 s for a stage's kernels (measured by this
warm-up on a cold cache), spread over the first stages and on the run's critical path.
Preprocessing and the stage crops, which come first, use no threads and are largely file
reading and writing, so the ``compile_kernels`` rule runs :func:`compile_kernels` on one core
beside them, and Numba's on-disk cache (``cryoday.jit.CACHE``) hands the stages compiled
kernels.

The warm-up is a miniature run through the same calls, with arrays of the same types, as the
real one: two stages of :func:`cryoday.stage.run_stage` (a random start, then one from its
state, so with importance sampling) on a memory-mapped ``.mrcs`` stack of pure noise with
coloured noise and per-particle CTFs, each ending with the final pose pass and the noise
refinement, then the final map's known-pose insertion (and, with a point group, its
symmetrisation). The Numba types of its arguments are those a stage passes, so the cache
entries it writes are the ones a stage looks up. A kernel it does not reach (another class
count or point group than the user's section, say) is compiled where it is first used, as
without it; a warm cache makes the whole warm-up take seconds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

# The miniature: small enough to run in seconds once compiled, large enough that every stage
# step (held-out set, minibatches, importance sampling after the first stage) is reached.
BOX, PIXEL_SIZE, N_IMAGES = 24, 6.0, 120
STAGES_A = (40.0, 24.0)


def _miniature_section(section: dict) -> dict:
    """The user's ``reconstruction`` section, cut to a few iterations of one start."""
    return {**section, "max_iterations": 4, "min_iterations": 0, "heldout_every": 2,
            "checkpoint_every": 1000, "max_particles": None, "minibatch_size": 20,
            "stages_A": list(STAGES_A), "seeds": [1]}


def _exhaustive(images, ctf: dict, pixel_size: float, resolution_A: float, spectrum, volume):
    """The likelihood with every image on the whole grid (a stage's iterations before importance
    sampling starts, and its group kernel), with and without the gradient, as a stage calls it
    (:class:`cryoday.stage._Data` builds the batch)."""
    from cryoday.likelihood import marginal_nll
    from cryoday.pose_sets import exhaustive_subsets
    from cryoday.projection import SliceOperator
    from cryoday.quadrature import pose_grid
    from cryoday.stage import _Data

    box = images.shape[-1]
    op = SliceOperator(box, box * pixel_size / resolution_A)
    grid = pose_grid(resolution_A, box, pixel_size, 2.0)
    data = _Data(op, images, ctf, 1.0, pixel_size, spectrum, np.zeros(len(images), np.int64))
    rows = np.arange(8)
    for want_grad in (False, True):
        marginal_nll(op, volume, data.batch(rows), grid, exhaustive_subsets(grid, len(rows)),
                     want_grad=want_grad)


def compile_kernels(section: dict, log=print, groups=None) -> float:
    """Run the miniature (see the module docstring) with ``section``'s settings; returns its
    wall time in seconds.

    ``groups``: the point groups the datasets train in (RELION's names, ``auto`` read as C1),
    when a dataset sets its own ``symmetry:``; the miniature trains in the first that is not
    C1 (the lookup's kernel and the stage's symmetrised gradients compile alike for every
    group), else in ``section``'s.
    """
    from cryoday import io, noise, reconstruct
    from cryoday.initial import random_blobs, resample_for_stage
    from cryoday.stage import run_stage
    from cryoday.stage_config import StageConfig, training_symmetry

    start = time.perf_counter()
    group = next((g for g in map(training_symmetry, groups or []) if g != "C1"), None)
    if group is not None:
        section = {**section, "symmetry": group}
    section = _miniature_section(section)
    rng = np.random.default_rng(0)
    n = N_IMAGES
    ctf = {"defocus_u": rng.uniform(1e4, 2e4, n).astype(np.float32),
           "defocus_angle": rng.uniform(0, 180, n).astype(np.float32)}
    ctf["defocus_v"] = ctf["defocus_u"] * np.float32(0.98)
    for key, value in (("voltage", 300.0), ("cs", 2.7), ("amplitude_contrast", 0.1),
                       ("bfactor", 0.0), ("phase_shift", 0.0)):
        ctf[key] = np.full(n, value, np.float32)
    heldout = np.zeros(n, bool)
    heldout[::10] = True
    spectrum = noise.NoiseSpectrum.white(BOX, PIXEL_SIZE)
    spectrum.power[:] = np.linspace(3.0, 0.5, spectrum.power.shape[1])  # coloured
    n_classes = int(section.get("classes", 1))
    with tempfile.TemporaryDirectory(prefix="cryoday-warmup-") as tmp:
        state = None
        volume = None
        for stage, resolution in enumerate(STAGES_A, 1):
            box = BOX if stage == len(STAGES_A) else BOX * 2 // 3
            pixel_size = PIXEL_SIZE * BOX / box
            stack = Path(tmp) / f"stage{stage}.mrcs"
            with io.StackWriter(stack, n, box, pixel_size) as writer:
                writer.data[0:n] = rng.standard_normal((n, box, box)).astype(np.float32)
            config = StageConfig.from_config(section, stage, 1)
            if volume is None:
                starts = [random_blobs(box, pixel_size, seed=c + 1) for c in range(n_classes)]
            else:
                starts = [resample_for_stage(v, box) for v in volume]
            result = run_stage(
                np.stack(starts) if n_classes > 1 else starts[0], io.open_stack(stack), ctf,
                sigma=1.0, pixel_size=pixel_size, resolution_A=resolution,
                train_rows=np.flatnonzero(~heldout), heldout_rows=np.flatnonzero(heldout),
                config=config, sagd_state=state, log=lambda line: None, scale_start=stage == 1,
                noise=spectrum, noise_group=np.zeros(n, np.int64), full_box=BOX)
            state = Path(tmp) / f"state{stage}.npz"
            result.save_state(state)
            volume = result.volumes  # (K, box, box, box), K = 1 too
            log(f"warm-up stage {stage} ({resolution:g} A, {box} px) compiled and ran, "
                f"{time.perf_counter() - start:.1f} s")
        images = io.open_stack(stack)
        _exhaustive(images, ctf, pixel_size, resolution, spectrum, volume[0])
        sums = reconstruct.insert(lambda rows: io.read_rows(images, rows), n, result.rotations,
                                  result.shifts_px, ctf, PIXEL_SIZE, BOX,
                                  weights=np.ones(n), image=np.arange(n))
        # The final map's lookup with a point group (~10 s to compile; nothing for C1).
        reconstruct.symmetrise(sums, training_symmetry(section.get("symmetry", "C1")))
    elapsed = time.perf_counter() - start
    log(f"warm-up done: the kernels of a stage, its pose pass and the final insertion are "
        f"compiled and cached, {elapsed:.1f} s")
    return elapsed
