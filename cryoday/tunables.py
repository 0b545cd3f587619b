"""Engine tunables that are not user settings: byte budgets, block sizes, padding, cache sizes.

Each has a one-line reason. User-facing settings live in ``workflow/schemas/config.schema.yaml``
(their defaults only there); what is here changes speed or memory, not results beyond float
tolerance, unless its comment says otherwise. Numba's compilation flags are in ``cryoday.jit``.
"""

# ---------------------------------------------------------------- image batches (cryoday.batch)
# Zero padding of the images before their transforms are turned by bilinear interpolation: the
# interpolation error falls with it (2.6% at 2, 0.6% at 4) and the padded transforms, rebuilt per
# minibatch, grow as its square. Changes the objective slightly.
IMAGE_PADDING = 3.0


# ---------------------------------------------------------------- likelihood (cryoday.likelihood)
# Width (Fourier px) of the soft edge inside the cutoff: with a hard one, sums over a turned
# image's coefficients jump with the angle by the power on the rim. Changes the objective.
TAPER_PX = 1.5
# Distinct directions per block of images: bounds the slices and the per-thread gradient
# accumulators (workflow/rules/common.smk's memory estimate assumes 4,000).
MAX_DIRECTIONS_PER_BLOCK = 4000
# Per thread, the (in-plane x shift) columns built at once: large enough that an importance
# sample's columns are built once and kept for the gradient pass.
COLUMN_BYTES = 32 << 20
# Per group of images sharing their directions: their columns, cross terms and posteriors, kept
# within about half of a core's L2 cache.
GROUP_BYTES = 1 << 20
# Tilt (rad) of the bands in which directions are sliced in turn: consecutive slices then read
# nearby parts of the cube; much narrower bands lose more between sweeps than they gain.
LOCALITY_BAND = 0.1


# ---------------------------------------------------------------- importance sampling
# The first two set how a batch's rows are split into chunks, and each chunk seeds its own draws:
# changing them draws other (equally valid) samples from the same seeds.
ROWS_AT_ONCE = 256  # images per (image x grid) proposal/posterior array: vectorised, yet bounded
BYTES_AT_ONCE = 32 << 20  # per such float64 array: at 4 A on 128-px data a grid has 1e5 directions
CACHED_BATCHES = 2  # sample sets kept per iteration: the minibatch (its line search asks again) + 1
# Smoothing kernels drop values below e^-KERNEL_CUTOFF of their peak, to keep their matrices sparse;
# it moves proposals by less than that fraction, but any change of proposals changes the draws.
KERNEL_CUTOFF = 20.0


# ---------------------------------------------------------------- stages (cryoday.stage)
# A stage's images are read into memory up to this size and streamed from the stack beyond it:
# 2 GiB holds the demo and a 46,000-image stage up to ~120 px, and stays within a SLURM job's
# usual memory next to the stored gradients (``stage_mem_mb`` in common.smk counts it).
IMAGE_CACHE_BYTES = 2 << 30
# Prepared minibatches kept per stage: a step's line search and the held-out set revisit the
# same few batches, and more would cost four padded transforms per image each.
KEPT_BATCHES = 4

# ---------------------------------------------------------------- simulator (cryoday.simulate)
# Bytes per complex128 (images x padded patch) array with ``extraction: cropped``: the patch is
# twice the box, so whole 1000-image chunks would need ~1.3 GB at 64 px and ~5 GB at 128 px.
SIM_CROPPED_BYTES_AT_ONCE = 64 << 20
