"""The kernel warm-up (``cryoday.warmup``, rule ``compile_kernels``) compiles the signatures a
stage then uses: after it, two stages on another memory-mapped stack, as the stage script runs
them, compile nothing new."""

from __future__ import annotations

import sys

import numba
import numpy as np
from stage_helpers import tiny_particle_set

from cryoday import initial, io, molecule, noise, warmup
from cryoday.stage import run_stage
from cryoday.stage_config import StageConfig, default_reconstruction_config


def compiled_signatures() -> dict:
    """Every cryoday Numba kernel's compiled signatures."""
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("cryoday"):
            continue
        for attr, value in vars(module).items():
            if isinstance(value, numba.core.registry.CPUDispatcher):
                found[f"{value.py_func.__module__}.{attr}"] = set(value.signatures)
    return found


def test_a_stage_after_the_warm_up_compiles_nothing(tmp_path):
    box, psize, n = 32, 7.0, 60
    # Simulated first: the simulator's kernels are not the stage's.
    images, ctf = tiny_particle_set(molecule.synthetic_molecule(box, psize), psize, n, seed=4)
    warmup.compile_kernels(default_reconstruction_config(), log=lambda *_: None)
    before = compiled_signatures()
    # The entry points called from Python (the kernels they call are compiled into them).
    assert sum(len(s) for s in before.values()) >= 10
    # As io.ctf_params gives them: float32 per particle, every key.
    ctf = {k: np.broadcast_to(np.asarray(v, np.float32), (n,)).copy() for k, v in ctf.items()}
    for key in ("bfactor", "phase_shift"):
        ctf[key] = np.zeros(n, np.float32)
    stack = tmp_path / "stage.mrcs"
    with io.StackWriter(stack, n, box, psize) as writer:
        writer.data[0:n] = images
    spectrum = noise.NoiseSpectrum.white(box, psize)
    spectrum.power[:] = np.linspace(2.0, 0.7, spectrum.power.shape[1])
    rows = np.arange(n)
    state = None
    volume = initial.random_blobs(box, psize, seed=3)
    for stage, resolution in ((1, 40.0), (2, 25.0)):
        section = default_reconstruction_config(minibatch_size=15, max_iterations=3,
                                                min_iterations=0, heldout_every=1)
        result = run_stage(volume, io.open_stack(stack), ctf, 1.0, psize, resolution,
                           rows[10:], rows[:10], StageConfig.from_config(section, stage, 2),
                           sagd_state=state, log=lambda *_: None, scale_start=stage == 1,
                           noise=spectrum, noise_group=np.zeros(n, np.int64), full_box=box)
        state = tmp_path / f"state{stage}.npz"
        result.save_state(state)
        volume = result.volume

    after = compiled_signatures()
    new = {name: after[name] - before.get(name, set()) for name in after}
    assert not {name: sig for name, sig in new.items() if sig}
