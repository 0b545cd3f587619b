"""One pass over the normalised stack writes every stage's crop, as the per-stage pass did."""

from __future__ import annotations

import json
from contextlib import ExitStack

import numpy as np
import pytest

from cryoday import io, preprocess

# The demo's stages at 64 px, 3 A/px, and one at Nyquist (the whole box, copied as it is).
STAGES_A = [40.0, 30.0, 20.0, 15.0, 12.0, 10.0, 6.0]


def _old_stage_json(info: dict, resolution: float) -> dict:
    """What scripts/downsample.py wrote per stage before the one-pass rule (copied from it)."""
    box, pixel_size = info["box"], info["pixel_size"]
    new_box, new_pixel_size = preprocess.stage_box(box, pixel_size, resolution)
    return {
        "resolution_A": resolution,
        "box": new_box,
        "pixel_size": new_pixel_size,
        "noise_sigma": new_box / box,
        "full_box": box,
        "full_pixel_size": pixel_size,
        "particle_diameter_A": info.get("particle_diameter_A"),
    }


def test_stage_files_equal_the_per_stage_pass_bit_for_bit(tmp_path, rng):
    n, box, pixel_size = 53, 64, 3.0
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    full = tmp_path / "particles.mrcs"
    with io.StackWriter(full, n, box, pixel_size) as writer:
        writer.data[0:n] = images
    info = {"box": box, "pixel_size": pixel_size, "particle_diameter_A": 150.0}
    stack = io.open_stack(full)
    stages = [preprocess.stage_info(info, r) for r in STAGES_A]
    assert [s["box"] for s in stages][-1] == box  # the copy path is covered
    paths = [tmp_path / f"new{k}.mrcs" for k in range(len(stages))]
    with ExitStack() as context:
        writers = [context.enter_context(io.StackWriter(path, n, s["box"], s["pixel_size"]))
                   for path, s in zip(paths, stages)]
        preprocess.stage_stacks_stream(lambda rows: io.read_rows(stack, rows), n,
                                       [w.data for w in writers], [s["box"] for s in stages],
                                       chunk_size=20)
    for k, (resolution, s) in enumerate(zip(STAGES_A, stages)):
        old = tmp_path / f"old{k}.mrcs"
        with io.StackWriter(old, n, s["box"], s["pixel_size"]) as writer:
            preprocess.downsample_stream(lambda rows: io.read_rows(stack, rows), n,
                                         writer.data, s["box"], chunk_size=1000)
        new_bytes, old_bytes = paths[k].read_bytes(), old.read_bytes()
        # Header (but for the labels, where mrcfile stamps the creation time) and images.
        assert len(new_bytes) == len(old_bytes)
        assert new_bytes[:220] == old_bytes[:220], f"stage {k + 1} ({resolution} A) header"
        assert new_bytes[1024:] == old_bytes[1024:], f"stage {k + 1} ({resolution} A) images"
        assert json.dumps(s, indent=2) == json.dumps(_old_stage_json(info, resolution), indent=2)


def test_each_image_is_read_once_in_chunks(rng):
    n, box, chunk = 23, 32, 5
    images = rng.standard_normal((n, box, box)).astype(np.float32)
    reads = []

    def read(rows):
        reads.append(np.asarray(rows))
        return images[rows]

    boxes = [12, 20, 32]
    outs = [np.full((n, b, b), np.nan, np.float32) for b in boxes]
    preprocess.stage_stacks_stream(read, n, outs, boxes, chunk_size=chunk)
    assert max(len(r) for r in reads) <= chunk
    assert np.array_equal(np.concatenate(reads), np.arange(n))
    for out, b in zip(outs, boxes):
        single = np.empty((n, b, b), np.float32)
        preprocess.downsample_stream(lambda rows: images[rows], n, single, b, chunk_size=n)
        assert np.array_equal(out, single)
    # The crop keeps each image's mean (mean-preserving Fourier crop).
    assert np.allclose(outs[0].mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1e-5)


def test_a_larger_box_than_the_images_is_refused(rng):
    images = rng.standard_normal((3, 16, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="larger box"):
        preprocess.stage_stacks_stream(lambda rows: images[rows], 3,
                                       [np.empty((3, 18, 18))], [18])
