"""What a run of K classes says about each class: its particles, its evidence of a structure,
how it relates to the other classes and, for a simulation, to the truth.

The engine (``reconstruction.classes``) writes each stage's ``classes.npz`` and each particle's
``class_posterior`` in ``poses.npz`` (:mod:`cryoday.records`). Everything here is computed from
those arrays and from maps already in memory; the rules ``class_summary`` and
``class_outputs`` (``final/classes.json``, ``final/class{k}/``), ``validate`` (the ``classes``
section of ``metrics.json``) and ``make_report`` read it.

A particle's class is its most probable one (the posterior's argmax), as RELION's
``rlnClassNumber``; a class's *size* counts those particles, its *posterior mass* sums every
particle's posterior for it (the two differ when assignments are uncertain).

A class is called junk when its particles hold no evidence of a structure: the held-out
likelihood test of :func:`cryoday.validation.heldout_signal_test`, taken on the held-out
particles assigned to the class, finds the map no better than empty density. Pure noise, ice
and carbon gather in such a class. Projections of another molecule are not junk by this test
(they hold a structure); :func:`class_agreement` tells whether two classes are one molecule.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np

from cryoday import io, records

# Two classes "look like the same molecule" when their maps, aligned (rotation, shift, hand),
# agree to FSC 0.5 at a resolution finer than this factor times the last stage's. A class map
# holds nothing beyond the stage's resolution, and two random starts of one molecule agree
# there to about FSC 0.143 at 1.25x it (validation.SEED_AGREEMENT_FACTOR); FSC 0.5 at 2x
# leaves room for a class trained on a small share of the particles, while two different
# folds (or a noise class against anything) stay below 0.5 from the first shells on.
SAME_MOLECULE_FACTOR = 2.0
# ...and only when that FSC 0.5 crossing lies beyond this Fourier shell: the first shells hold a
# few dozen voxels each, and an alignment searched over rotations, shifts and hand makes any two
# maps agree there (a noise map met a molecule's to shell 1.5 on a 10 px stage box, and two
# different molecules of one size, trained at 25 A, met to shell 4.01 on a 32 px box).
SAME_MOLECULE_MIN_SHELL = 5

# The truth's kinds of particle in a simulation (cryoday.simulate.JUNK_*), by column value.
TRUTH_KINDS = {0: "map", 1: "noise", 2: "other_map"}


def assigned_classes(posterior: np.ndarray) -> np.ndarray:
    """Each particle's most probable class, 0-based ``(n,)`` int64 (ties go to the lower)."""
    return np.argmax(np.asarray(posterior), axis=1).astype(np.int64)


def n_classes(poses: dict) -> int:
    """K of a stage's :func:`cryoday.records.read_poses` (1 without a class posterior)."""
    return int(records.class_posterior(poses).shape[1])


def class_poses(poses: dict, k: int, assigned: np.ndarray | None = None) -> dict:
    """``poses`` with ``heldout_rows`` restricted to the held-out particles assigned to class
    ``k`` (0-based), for :func:`cryoday.validation.heldout_signal_test`."""
    if assigned is None:
        assigned = assigned_classes(records.class_posterior(poses))
    rows = np.asarray(poses["heldout_rows"], np.int64)
    return {**poses, "heldout_rows": rows[assigned[rows] == k]}


def class_signal(poses: dict, k: int, assigned: np.ndarray | None = None) -> dict | None:
    """The held-out signal test on class ``k``'s held-out particles (None with fewer than 2)."""
    from cryoday.validation import heldout_signal_test

    return heldout_signal_test(class_poses(poses, k, assigned))


def junk_verdict(size: int, signal: dict | None) -> tuple[bool | None, str]:
    """``(junk, why)`` of a class: True when it is empty or its held-out particles show no
    evidence of a structure, False when they do, None when too few were held out to say."""
    if size == 0:
        return True, "empty: no particle's most probable class"
    if signal is None:
        return None, "fewer than 2 of its particles are held out: no held-out test"
    if signal["evidence"]:
        return False, (f"evidence of a structure ({signal['gain_nats_per_image']:+.2f} nats per "
                       f"held-out image, z = {signal['z']:.1f})")
    why = signal["reason"] or (f"{signal['gain_nats_per_image']:+.2f} nats per held-out image, "
                               f"z = {signal['z']:.1f}")
    return True, f"no evidence of a structure ({why})"


def class_table(poses: dict, proportions, main: int) -> list[dict]:
    """One dict per class (in order): ``class`` (1-based), ``size`` (particles whose most
    probable class it is), ``size_fraction``, ``posterior_mass`` (sum of the posteriors),
    ``proportion`` (the learned one), ``main``, ``heldout_signal`` (:func:`class_signal`),
    ``junk`` and ``junk_reason`` (:func:`junk_verdict`).

    Parameters
    ----------
    poses : dict
        The last stage's :func:`cryoday.records.read_poses` (with ``class_posterior``).
    proportions : sequence of float
        The last stage's ``classes.npz`` proportions (K,).
    main : int
        The main class, 0-based (``classes.npz`` ``main``).
    """
    posterior = records.class_posterior(poses)
    proportions = np.asarray(proportions, np.float64)
    if posterior.shape[1] != len(proportions):
        raise ValueError(f"class posterior of {posterior.shape[1]} classes, "
                         f"{len(proportions)} proportions")
    assigned = assigned_classes(posterior)
    sizes = np.bincount(assigned, minlength=len(proportions))
    mass = posterior.astype(np.float64).sum(axis=0)
    out = []
    for k in range(len(proportions)):
        signal = class_signal(poses, k, assigned)
        junk, why = junk_verdict(int(sizes[k]), signal)
        out.append({"class": k + 1, "size": int(sizes[k]),
                    "size_fraction": float(sizes[k] / max(len(assigned), 1)),
                    "posterior_mass": float(mass[k]), "proportion": float(proportions[k]),
                    "main": k == int(main), "heldout_signal": signal, "junk": junk,
                    "junk_reason": why})
    return out


def write_class_summary(path, poses_path, classes_path, seed: int) -> dict:
    """Write ``final/classes.json`` from the chosen start's last ``poses.npz`` and
    ``classes.npz``: ``seed``, ``n_classes``, ``main`` (1-based) and ``classes``
    (:func:`class_table`). Returns what it wrote."""
    classes = records.read_classes(classes_path)
    table = class_table(records.read_poses(poses_path), classes["proportions"], classes["main"])
    out = {"seed": int(seed), "n_classes": len(table), "main": classes["main"] + 1,
           "assignment": "most probable class (rlnClassNumber, 1-based); "
                         "rlnMaxValueProbDistribution is that class's posterior",
           "classes": table}
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(out, indent=2))
    return out


def class_particles(final_star, k: int, star_out) -> int:
    """Write the particles of ``final_star`` whose ``rlnClassNumber`` is ``k`` (1-based) as
    ``star_out``, image names rewritten to find the same stacks from ``star_out``'s folder.
    Returns how many."""
    particles = io.read_particles(final_star, check_stacks=False, require_ctf=False)
    if "rlnClassNumber" not in particles.table:
        raise ValueError(f"{final_star}: no rlnClassNumber column (a run of one class)")
    keep = particles.table["rlnClassNumber"].to_numpy(np.int64) == int(k)
    table = particles.table.copy()
    table["rlnImageName"] = particles.image_names_from(Path(star_out).parent)
    io.write_particles(star_out, particles.original_table(table)[keep].reset_index(drop=True),
                       particles.optics)
    return int(keep.sum())


def confusion_table(truth_kinds: np.ndarray, assigned: np.ndarray, n: int) -> dict:
    """Counts of each kind of simulated particle (``TRUTH_KINDS``: ``map``, ``noise``,
    ``other_map``) per assigned class: ``{kind: [count in class 1, ..., class n]}``; kinds the
    simulation did not make are left out."""
    truth_kinds = np.asarray(truth_kinds, np.int64)
    assigned = np.asarray(assigned, np.int64)
    if len(truth_kinds) != len(assigned):
        raise ValueError(f"{len(truth_kinds)} truth rows, {len(assigned)} assigned particles")
    return {name: np.bincount(assigned[truth_kinds == value], minlength=n).tolist()
            for value, name in TRUTH_KINDS.items() if (truth_kinds == value).any()}


def molecule_classes(confusion: dict) -> list[int]:
    """The 0-based classes most of whose particles are the simulated molecule's (``map``)."""
    n = len(next(iter(confusion.values()), []))
    counts = np.array([confusion.get(name, [0] * n) for name in TRUTH_KINDS.values()])
    return [k for k in range(counts.shape[1])
            if counts[0, k] > 0 and counts[0, k] * 2 > counts[:, k].sum()]


def class_agreement(volumes, pixel_size: float, last_stage_A: float,
                    factor: float = SAME_MOLECULE_FACTOR) -> dict:
    """FSC between every pair of class maps after alignment, and which pairs are one molecule.

    Parameters
    ----------
    volumes : sequence of (b, b, b) arrays
        The class maps, one box and voxel size.
    pixel_size : float
        Their voxel size (A).
    last_stage_A : float
        The last stage's resolution (A).
    factor : float
        A pair is one molecule when its FSC 0.5 resolution is at most ``factor * last_stage_A``
        and finer than shell ``SAME_MOLECULE_MIN_SHELL`` of the maps' box.

    Returns
    -------
    dict
        ``pairs``: ``{"1-2": {"fsc05_A", "fsc0143_A", "same_molecule"}}`` (1-based classes),
        ``threshold_A`` (the finer of the two limits), ``factor``.
    """
    from cryoday.align import fsc_after_alignment
    from cryoday.fsc import resolution_at

    box_A = len(volumes[0]) * float(pixel_size) if len(volumes) else 0.0
    threshold = min(factor * float(last_stage_A), box_A / SAME_MOLECULE_MIN_SHELL)
    pairs = {}
    for a, b in combinations(range(len(volumes)), 2):
        _, freq, curve, res = fsc_after_alignment(volumes[a], volumes[b], pixel_size)
        res05 = resolution_at(freq, curve, 0.5)
        pairs[f"{a + 1}-{b + 1}"] = {"fsc05_A": float(res05), "fsc0143_A": float(res),
                                     "same_molecule": bool(res05 <= threshold)}
    return {"pairs": pairs, "threshold_A": threshold, "factor": float(factor)}


# A class's half maps are reconstructed only from this many particles on (fewer give an FSC
# of noise whatever the class).
HALFMAP_MIN_PARTICLES = 10


def class_metrics(poses: dict, stage_classes, stages_A, truth_star=None, reference=None,
                  box: int | None = None, pixel_size: float | None = None, *,
                  preprocessed_star=None, final_star=None,
                  log=print) -> tuple[dict, list[str]]:
    """``metrics["classes"]`` of a run of K > 1 classes, and the warnings it gives.

    Parameters
    ----------
    poses : dict
        The chosen start's last :func:`cryoday.records.read_poses`.
    stage_classes : sequence of path
        The chosen start's ``classes.npz`` of every stage, in stage order.
    stages_A : sequence of float
        The stages' resolutions (A).
    truth_star : path, optional
        A simulation's particles (their ``cryodaySimJunk`` column): the confusion table.
    reference : path, optional
        The simulation's truth map: each class of the molecule's particles is compared with it
        after alignment (at ``box`` and ``pixel_size``, the input's).
    box, pixel_size : int, float, optional
        The input box and pixel size (A), for the comparison with ``reference`` and the half
        maps.
    preprocessed_star, final_star : path, optional
        The preprocessed particles and ``final/particles.star``: each class of at least
        ``HALFMAP_MIN_PARTICLES`` gets gold-standard half maps from its particles at their final
        poses (:func:`cryoday.validation.halfmap_fsc`), ``halfmap_fsc0143_masked_A``.
    log : callable

    Returns
    -------
    section : dict
        ``n_classes``, ``main`` (1-based), ``classes`` (:func:`class_table`, each with
        ``fsc05_vs_truth_A`` / ``fsc0143_vs_truth_A`` when it is the molecule's, and
        ``halfmap_fsc0143_masked_A`` given the particles' files), ``junk``
        (1-based classes judged junk), ``agreement`` (:func:`class_agreement` of the last
        stage's maps), ``proportions_by_stage`` (each stage's final proportions) and, for a
        simulation, ``confusion`` (:func:`confusion_table`) and ``molecule_classes``.
    warnings : list of str
        Only about the main class: a junk class is what classes are for.
    """
    from cryoday.fourier import rescale_volume
    from cryoday.fsc import resolution_at

    stages = [records.read_classes(p) for p in stage_classes]
    last = stages[-1]
    table = class_table(poses, last["proportions"], last["main"])
    section = {"n_classes": len(table), "main": last["main"] + 1, "classes": table,
               "junk": [c["class"] for c in table if c["junk"]],
               "proportions_by_stage": [s["proportions"].tolist() for s in stages]}
    section["agreement"] = class_agreement(last["volumes"], last["pixel_size"],
                                           float(stages_A[-1]))
    for pair, figures in section["agreement"]["pairs"].items():
        if figures["same_molecule"]:
            log(f"classes {pair} look like the same molecule (FSC 0.5 at "
                f"{figures['fsc05_A']:.1f} A after alignment)")
    assigned = assigned_classes(records.class_posterior(poses))
    if truth_star:
        from cryoday.simulate import JUNK_COLUMN

        truth = io.read_particles(truth_star, check_stacks=False).table
        if JUNK_COLUMN in truth:
            section["confusion"] = confusion_table(truth[JUNK_COLUMN].to_numpy(), assigned,
                                                   len(table))
        else:  # a simulation without junk: every particle is the molecule's
            section["confusion"] = confusion_table(np.zeros(len(truth), np.int64), assigned,
                                                   len(table))
        section["molecule_classes"] = [k + 1 for k in molecule_classes(section["confusion"])]
        log(f"confusion of the truth against the classes: {section['confusion']}")
    if reference and box and pixel_size:
        from cryoday.align import fsc_after_alignment

        ref, ref_voxel = io.read_map(reference)
        if ref.shape[0] != box or (ref_voxel and abs(ref_voxel - pixel_size) > 1e-3):
            ref = rescale_volume(ref, ref_voxel or pixel_size, box, pixel_size)
        # Every class with a structure against the reference (a set of two molecules matches a
        # reference of one in one class, not necessarily the main one); a simulation's
        # molecule classes also under the truth's name.
        molecules = set(section.get("molecule_classes", []))
        for k, c in enumerate(table, 1):
            if c["junk"] and k not in molecules:
                continue
            volume = rescale_volume(last["volumes"][k - 1], last["pixel_size"], box, pixel_size)
            _, freq, curve, res = fsc_after_alignment(volume, ref, pixel_size)
            c["fsc0143_vs_reference_A"] = float(res)
            c["fsc05_vs_reference_A"] = float(resolution_at(freq, curve, 0.5))
            if k in molecules:
                c["fsc0143_vs_truth_A"] = c["fsc0143_vs_reference_A"]
                c["fsc05_vs_truth_A"] = c["fsc05_vs_reference_A"]
    if preprocessed_star and final_star and box and pixel_size:
        from cryoday.fsc import fsc, soft_spherical_mask
        from cryoday.validation import halfmap_fsc

        mask = soft_spherical_mask(box, 0.4 * box, 3.0)  # validation's half-map mask
        for k, c in enumerate(table):
            rows = np.flatnonzero(assigned == k)
            if len(rows) < HALFMAP_MIN_PARTICLES:
                c["halfmap_fsc0143_masked_A"] = None
                continue
            half1, half2 = halfmap_fsc(preprocessed_star, final_star, box, pixel_size, log,
                                       rows=rows)
            freq, curve = fsc(half1, half2, pixel_size, mask=mask)
            c["halfmap_fsc0143_masked_A"] = float(resolution_at(freq, curve, 0.143))
            log(f"class {k + 1}: half-map FSC 0.143 {c['halfmap_fsc0143_masked_A']:.1f} A "
                f"masked ({len(rows)} particles)")
    warnings = []
    main = table[last["main"]]
    if main["junk"]:
        warnings.append(f"the main class (class {main['class']}, {main['size']} particles) is "
                        f"junk: {main['junk_reason']}; the final map is not a structure")
    return section, warnings
