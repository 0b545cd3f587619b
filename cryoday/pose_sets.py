"""The poses each image evaluates: per-image subsets of a pose grid's directions, in-plane
angles and shifts, with their log weights.

A rotation is an in-plane turn after a direction (``cryoday.quadrature``), so an image's
rotations are the product of its directions and its in-plane angles, and its poses that product
times its shifts. The importance sampler draws such subsets; a stage without it evaluates every
pose (:func:`exhaustive_subsets`), and the null likelihood of a map needs only the in-plane
angles (:func:`empty_map_subsets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


# eq=False: compared and hashed by identity. It is treated as immutable and keys the
# likelihood's per-subsets plans (cryoday.likelihood); field-wise == of arrays means nothing.
@dataclass(eq=False)
class PoseSubsets:
    """Per-image (ragged) subsets of the grid's directions, in-plane angles and shifts.

    Image ``i`` evaluates the product of ``dir_index[dir_offsets[i]:dir_offsets[i+1]]``,
    ``inp_index[inp_offsets[i]:...]`` and ``shift_index[shift_offsets[i]:...]``; the ``*_logw``
    are log quadrature weights (with importance corrections when sampled). Treat it as
    immutable: quantities derived from it are kept on it (``rot_*``, ``n_points``). The
    rotations an image evaluates are ``d * n_inp + p`` over its directions ``d`` and in-plane
    angles ``p``, direction-major (``rot_*`` below), which is the order of
    ``LikelihoodResult.rot_post``.
    """

    n_inp: int
    dir_offsets: np.ndarray
    dir_index: np.ndarray
    dir_logw: np.ndarray
    inp_offsets: np.ndarray
    inp_index: np.ndarray
    inp_logw: np.ndarray
    shift_offsets: np.ndarray
    shift_index: np.ndarray
    shift_logw: np.ndarray

    @classmethod
    def from_sets(cls, n_inp, dir_sets, dir_logws, inp_sets, inp_logws, shift_sets, shift_logws
                  ) -> PoseSubsets:
        """From per-image lists of index arrays and their log weights."""
        def ragged(sets, logws):
            offsets = np.concatenate([[0], np.cumsum([len(x) for x in sets])]).astype(np.int64)
            return (offsets, np.concatenate(sets).astype(np.int64),
                    np.concatenate(logws).astype(np.float64))

        return cls(int(n_inp), *ragged(dir_sets, dir_logws), *ragged(inp_sets, inp_logws),
                   *ragged(shift_sets, shift_logws))

    @property
    def n_images(self) -> int:
        return len(self.dir_offsets) - 1

    @cached_property
    def rot_offsets(self) -> np.ndarray:
        counts = np.diff(self.dir_offsets) * np.diff(self.inp_offsets)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _rot_product(self, dir_values, inp_values, combine):
        """``combine(dir_value, inp_value)`` over each image's (direction, in-plane) product,
        direction-major, for all images at once."""
        n_p = np.diff(self.inp_offsets)
        image = np.repeat(np.arange(self.n_images), np.diff(self.rot_offsets))
        local = np.arange(len(image)) - self.rot_offsets[image]
        return combine(dir_values[self.dir_offsets[image] + local // n_p[image]],
                       inp_values[self.inp_offsets[image] + local % n_p[image]])

    @cached_property
    def rot_index(self) -> np.ndarray:
        n_inp = self.n_inp
        return self._rot_product(self.dir_index, self.inp_index,
                                 lambda d, p: d * n_inp + p).astype(np.int64)

    @cached_property
    def rot_logw(self) -> np.ndarray:
        return self._rot_product(self.dir_logw, self.inp_logw, np.add)

    @cached_property
    def n_points(self) -> int:
        return int((np.diff(self.dir_offsets) * np.diff(self.inp_offsets)
                    * np.diff(self.shift_offsets)).sum())

    def block(self, lo: int, hi: int) -> PoseSubsets:
        """The subsets of images ``lo:hi``."""
        def cut(offsets, index, logw):
            a, b = offsets[lo], offsets[hi]
            return offsets[lo:hi + 1] - a, index[a:b], logw[a:b]

        return PoseSubsets(self.n_inp, *cut(self.dir_offsets, self.dir_index, self.dir_logw),
                           *cut(self.inp_offsets, self.inp_index, self.inp_logw),
                           *cut(self.shift_offsets, self.shift_index, self.shift_logw))

    def take(self, images) -> PoseSubsets:
        """The subsets of the images at the indices ``images``, in that order."""
        images = np.asarray(images, dtype=np.int64)

        def gather(offsets, index, logw):
            counts = offsets[images + 1] - offsets[images]
            new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            picked = (np.repeat(offsets[images] - new_offsets[:-1], counts)
                      + np.arange(new_offsets[-1]))
            return new_offsets, index[picked], logw[picked]

        return PoseSubsets(self.n_inp,
                           *gather(self.dir_offsets, self.dir_index, self.dir_logw),
                           *gather(self.inp_offsets, self.inp_index, self.inp_logw),
                           *gather(self.shift_offsets, self.shift_index, self.shift_logw))


def exhaustive_subsets(grid, n_images: int) -> PoseSubsets:
    """Every direction, in-plane angle and shift of ``grid`` for each of ``n_images`` images."""
    def every(n, logw):
        return (np.arange(n_images + 1, dtype=np.int64) * n,
                np.tile(np.arange(n, dtype=np.int64), n_images),
                np.tile(np.asarray(logw, np.float64), n_images))

    return PoseSubsets(grid.n_inp, *every(grid.n_dir, grid.dir_log_weights),
                       *every(grid.n_inp, grid.inp_log_weights),
                       *every(grid.n_shift, grid.shift_log_weights))


def empty_map_subsets(grid, n_images: int) -> PoseSubsets:
    """The poses that give -log p(I | V = 0) exactly: one direction and shift, every in-plane angle.

    With an empty volume the energy of a turned image is ``|d_p|^2 / 2 s2`` whatever the
    direction and shift, so summing over the in-plane angles alone is exact: the likelihood of the
    images as pure noise, on the same footing as any map's.
    """
    one = np.arange(n_images + 1, dtype=np.int64)
    zeros_i, zeros_w = np.zeros(n_images, np.int64), np.zeros(n_images, np.float64)
    return PoseSubsets(grid.n_inp, one, zeros_i, zeros_w,
                       np.arange(n_images + 1, dtype=np.int64) * grid.n_inp,
                       np.tile(np.arange(grid.n_inp, dtype=np.int64), n_images),
                       np.tile(np.asarray(grid.inp_log_weights, np.float64), n_images),
                       one.copy(), zeros_i.copy(), zeros_w.copy())


def common_directions(subsets: PoseSubsets) -> np.ndarray | None:
    """The directions every image evaluates, in order, if they all evaluate the same ones with
    the same log prior weights (the likelihood's group kernel gives a group's images one row of
    weights); None otherwise, or for fewer than two images."""
    n = subsets.n_images
    counts = np.diff(subsets.dir_offsets)
    if n < 2 or np.any(counts != counts[0]):
        return None
    first = subsets.dir_index[:counts[0]]
    for values in (subsets.dir_index, subsets.dir_logw):
        if not np.array_equal(values.reshape(n, -1),
                              np.broadcast_to(values[:counts[0]], (n, counts[0]))):
            return None
    return first
