"""Ground-truth densities: a built-in synthetic molecule, and maps from atomic models (gemmi)."""

from __future__ import annotations

import numpy as np

from cryoday.errors import InputError
from cryoday.fourier import rescale_volume


def _render_gaussians(centres_A: np.ndarray, weights: np.ndarray, sigma_A: np.ndarray,
                      box: int, pixel_size: float) -> np.ndarray:
    """Sum of 3D Gaussians (centres in A from the box centre), sampled on a ``[z, y, x]`` grid."""
    axis = (np.arange(box) - box // 2) * pixel_size
    volume = np.zeros((box, box, box), dtype=np.float64)
    for (x, y, z), w, s in zip(centres_A, weights, sigma_A):
        gx = np.exp(-((axis - x) ** 2) / (2 * s * s))
        gy = np.exp(-((axis - y) ** 2) / (2 * s * s))
        gz = np.exp(-((axis - z) ** 2) / (2 * s * s))
        volume += w * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    return volume.astype(np.float32)


def _blobs_at(points, rng: np.random.Generator, box: int, pixel_size: float) -> np.ndarray:
    """Gaussian blobs of random weight and width at ``points`` (A), centred on their mean and
    rendered to a maximum of 1: the last step of both built-in molecules."""
    points = np.array(points)
    points -= points.mean(axis=0)
    weights = rng.uniform(0.7, 1.3, len(points))
    sigmas = max(pixel_size, 2.5) * rng.uniform(1.0, 1.4, len(points))
    volume = _render_gaussians(points, weights, sigmas, box, pixel_size)
    return volume / volume.max()


def synthetic_molecule(box: int, pixel_size: float, seed: int = 0) -> np.ndarray:
    """A deterministic, asymmetric, protein-like density for demos and tests.

    Three globular domains of different sizes built from Gaussian "pseudo-residues" along random
    chains, joined by linkers, plus a long helical arm and a closed loop with a hole through it:
    no point-group symmetry and no mirror
    symmetry, a diameter of ~60% of the box. The chain is laid out with steps of ~5 A (or 1.6 px),
    but each pseudo-residue is drawn narrower (sigma 1-1.4 x max(2.5 A, 1 px)), so the map
    keeps power out to 8-10 A as a protein does: drawn as wide as the step, its power fell 10^5-fold
    from 16 A to 10 A, and even 20,000 particles at the true poses could not pass 14 A. The same
    (box, pixel_size, seed) always gives the same map.

    Returns
    -------
    numpy.ndarray
        float32 ``[z, y, x]`` non-negative density, maximum 1.
    """
    rng = np.random.default_rng(seed)
    diameter = 0.6 * box * pixel_size
    domain_centres = np.array([[-0.22, -0.12, 0.05], [0.2, -0.05, -0.1], [0.02, 0.24, 0.12]])
    domain_centres = domain_centres * diameter
    domain_radii = np.array([0.24, 0.19, 0.14]) * diameter
    residue_sigma = max(2.0 * pixel_size, 3.0)
    points = []
    for centre, radius in zip(domain_centres, domain_radii):
        # A compact random walk confined to the domain's sphere mimics a folded chain.
        n = int(60 * (radius / residue_sigma) ** 1.5 / 8) + 20
        position = centre.copy()
        for _ in range(n):
            step = rng.normal(size=3)
            position = position + 0.8 * residue_sigma * step / np.linalg.norm(step)
            offset = position - centre
            if np.linalg.norm(offset) > radius:
                position = centre + offset * radius / np.linalg.norm(offset) * 0.9
            points.append(position.copy())
    # Linkers between domains.
    for a, b in ((0, 1), (1, 2)):
        for t in np.linspace(0, 1, 8):
            points.append(domain_centres[a] * (1 - t) + domain_centres[b] * t)
    # A helical arm leaving domain 0: a handed feature that fixes the molecule's hand.
    start = domain_centres[0]
    for t in np.linspace(0, 1, 24):
        angle = 4 * np.pi * t
        points.append(start + np.array([-0.05 + 0.02 * np.cos(angle), -0.3 * t,
                                        0.02 * np.sin(angle) - 0.25 * t]) * diameter)
    # A closed loop beside domain 1, tilted off the axes: a hole ~20 A across at 3 A/px that a 10 A
    # reconstruction should resolve (cf. GroEL's cavity in the paper).
    ring_centre = domain_centres[1] + np.array([0.06, -0.2, 0.16]) * diameter
    u, v = np.array([1.0, 0.3, 0.0]), np.array([-0.2, 0.5, 0.8])
    u /= np.linalg.norm(u)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    ring_radius = 3.0 * residue_sigma  # hole visible only if radius >~ 3 blob widths
    for angle in np.linspace(0, 2 * np.pi, 24, endpoint=False):
        points.append(ring_centre + ring_radius * (np.cos(angle) * u + np.sin(angle) * v))
    return _blobs_at(points, rng, box, pixel_size)


def other_molecule(box: int, pixel_size: float, seed: int = 0) -> np.ndarray:
    """A second built-in density, unlike :func:`synthetic_molecule`: junk and a second test map.

    An elongated, bent body: a thick curved rod of pseudo-residues (a quarter of a helix of
    large radius) spanning ~60% of the box, with a small knob near one end and a flat paddle at
    the other. Elongated where the synthetic molecule is globular, so their projections do not
    look alike at any pose. Same pseudo-residue widths as :func:`synthetic_molecule`, so it
    holds power to the same resolution; the same arguments always give the same map.

    Returns
    -------
    numpy.ndarray
        float32 ``[z, y, x]`` non-negative density, maximum 1.
    """
    rng = np.random.default_rng([seed, 2])
    length = 0.6 * box * pixel_size
    residue_sigma = max(2.0 * pixel_size, 3.0)
    t = np.linspace(-0.5, 0.5, 90)
    # The rod's axis: a gentle arc in x-y rising along z, radius of the tube ~ 1.5 blobs.
    axis = np.stack([t * length, 0.25 * length * (1 - 4 * t * t) - 0.1 * length,
                     0.15 * length * t], axis=1)
    points = []
    for centre in axis:
        for _ in range(3):
            step = rng.normal(size=3)
            points.append(centre + 1.5 * residue_sigma * step / np.linalg.norm(step))
    knob = axis[12] + np.array([0.0, -0.12, 0.08]) * length
    points += list(knob + 0.05 * length * rng.normal(size=(25, 3)))
    paddle_u, paddle_v = np.array([0.0, 0.0, 1.0]), np.array([0.6, 0.8, 0.0])
    for a in np.linspace(-1, 1, 6):
        for b in np.linspace(-1, 1, 4):
            points.append(axis[-8] + 0.09 * length * (a * paddle_u + 0.6 * b * paddle_v))
    return _blobs_at(points, rng, box, pixel_size)


def density_from_model(path, box: int, pixel_size: float, resolution_A: float | None = None
                       ) -> np.ndarray:
    """Electron-scattering density of a PDB/mmCIF model on a ``box^3`` grid, centred on it.

    Uses gemmi's structure reader and electron form factors (``DensityCalculatorE``), blurred to
    ``resolution_A`` (default twice the pixel size), as the paper did with GroEL-GroES.
    """
    import gemmi

    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable PDB/mmCIF model ({exc})") from exc
    structure.setup_entities()
    structure.remove_hydrogens()
    model = structure[0]
    coords = np.array([cra.atom.pos.tolist() for cra in model.all()])
    if len(coords) == 0:
        raise InputError(f"{path}: the model has no atoms")
    centre = coords.mean(axis=0)
    shift = gemmi.Position(*(box // 2 * pixel_size - centre))
    for chain in model:
        for residue in chain:
            for atom in residue:
                atom.pos = atom.pos + shift
    structure.cell = gemmi.UnitCell(box * pixel_size, box * pixel_size, box * pixel_size, 90, 90,
                                    90)
    structure.spacegroup_hm = "P 1"
    calc = gemmi.DensityCalculatorE()
    calc.d_min = resolution_A or 2 * pixel_size
    calc.rate = 1.5
    calc.set_grid_cell_and_spacegroup(structure)
    calc.put_model_density_on_grid(model)
    # gemmi's grid is indexed [x, y, z] and sized by d_min and rate; ours is [z, y, x] at the
    # requested sampling.
    grid = np.array(calc.grid, copy=True).transpose(2, 1, 0)
    n = grid.shape[0]
    # The model sits at the cell centre box//2 * pixel_size, which is grid voxel n * that / cell.
    grid = np.roll(grid, n // 2 - int(round(n * (box // 2) / box)), axis=(0, 1, 2))
    volume = rescale_volume(grid.astype(np.float32), box * pixel_size / n, box, pixel_size)
    volume = np.clip(volume, 0, None).astype(np.float32)
    return volume / volume.max()
