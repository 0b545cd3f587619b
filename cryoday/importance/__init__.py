"""Importance sampling over the pose and shift quadrature (Brubaker, Punjani & Fleet 2015,
section 3.3; the method as implemented is in ``docs/importance.md``).

Each image's posterior from its previous visit, kept sparse, proposes where to evaluate it at
the next: far fewer poses than the whole grid, with weights that keep the marginal likelihood
unbiased. One job per module:

- ``store``: the per-image posterior state and its serialisation (``state.npz``'s ``is_*``)
- ``schedule``: temperature, prior share and antipodal term as functions of the epoch
- ``geometry``: each grid factor's kernel embedding, snapping, smoothing matrices
- ``average``: the dataset-average posterior
- ``proposals``: the proposal mixture and the capped multinomial draws
- ``diagnostics``: KL to the proposal and between visits (Numba kernels)
- ``sampler``: :class:`ImportanceSampler`, the facade the stage driver uses
"""

from cryoday.importance.diagnostics import kl_on_union
from cryoday.importance.sampler import ImportanceSampler
from cryoday.importance.store import K_STORED, PosteriorStore

__all__ = ["ImportanceSampler", "K_STORED", "PosteriorStore", "kl_on_union"]
