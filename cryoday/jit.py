"""Numba compilation flags, in one place (as stumpy does).

``fastmath`` is limited to the flags that cannot change results on finite inputs beyond
reassociation; ``nnan``/``ninf`` are left out because bad input must surface as NaN, not be
optimised away.
"""

FASTMATH = {"contract", "arcp", "reassoc", "nsz", "afn"}
# Numba's on-disk cache is not invalidated by an edit to a kernel that a cached kernel of another
# module calls (seen here: a deliberately broken cryoday/posteriors.py still passed its test on a
# warm cache). After editing such a kernel, delete cryoday/__pycache__/*.nbi and *.nbc. A fresh
# clone or install compiles everything.
CACHE = True
