"""Engine tunables that are not user settings: byte budgets, block sizes, padding, cache sizes.

Each has a one-line reason. User-facing settings live in ``workflow/schemas/config.schema.yaml``
(their defaults only there); what is here changes speed or memory, not results beyond float
tolerance, unless its comment says otherwise. Numba's compilation flags are in ``cryoday.jit``.
"""

# ---------------------------------------------------------------- image batches (cryoday.batch)


# ---------------------------------------------------------------- likelihood (cryoday.likelihood)


# ---------------------------------------------------------------- importance sampling


# ---------------------------------------------------------------- stages (cryoday.stage)
