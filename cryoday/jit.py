"""Numba compilation flags, in one place (as stumpy does).

``fastmath`` is limited to the flags that cannot change results on finite inputs beyond
reassociation; ``nnan``/``ninf`` are left out because bad input must surface as NaN, not be
optimised away.
"""

FASTMATH = {"contract", "arcp", "reassoc", "nsz", "afn"}
CACHE = True
