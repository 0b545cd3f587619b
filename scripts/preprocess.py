"""Rule `preprocess`: validate the particles, detect contrast, normalise, pick held-out images."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _common import setup_logging

from cryoday import io, preprocess

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/preprocess.py dataset=demo
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("preprocess", **argv_wildcards())

log = setup_logging(snakemake)
opts = snakemake.params.options
particles = io.read_particles(snakemake.input.star, pixel_size=snakemake.params.pixel_size)
n, box, pixel_size = len(particles.table), particles.box, particles.pixel_size
log.info("%s: %d particles, %d px, %.4f A/px", snakemake.input.star, n, box, pixel_size)
# A bad reference map is refused now rather than after hours of reconstruction.
for reference in snakemake.input.reference:
    log.info(io.check_reference(reference, box, pixel_size))

mask_radius = opts["mask_radius_fraction"] * box / 2
with io.ImageSource(particles) as source:
    contrast = preprocess.detect_contrast(source.read, n, box, mask_radius=mask_radius)
    if opts["contrast"] == "auto":
        sign = contrast.sign
        if sign < 0:
            log.warning(
                "particles are dark on a bright background (z = %.1f over %d images); "
                "inverting the contrast so protein is bright, as RELION expects",
                contrast.z_score, contrast.n_used,
            )
        else:
            log.info("particles are bright on dark (z = %.1f over %d images), as RELION expects",
                     contrast.z_score, contrast.n_used)
    else:
        sign = -1 if opts["contrast"] == "invert" else 1
        log.info("contrast forced by config: %s (detected sign %+d, z = %.1f)",
                 opts["contrast"], contrast.sign, contrast.z_score)

    with io.StackWriter(snakemake.output.stack, n, box, pixel_size) as writer:
        means, sigmas = preprocess.preprocess_stream(
            source.read, n, box, writer.data, chunk_size=opts["chunk_size"], sign=sign,
            mask_radius=mask_radius,
        )

heldout = preprocess.choose_heldout(n, opts["n_heldout"], opts["heldout_seed"])
table = particles.table.copy()
stack_name = Path(snakemake.output.stack).name
table["rlnImageOriginalName"] = particles.table["rlnImageName"]
table["rlnImageName"] = [f"{i + 1:06d}@{stack_name}" for i in range(n)]
table["cryodayHeldOut"] = heldout.astype(int)
table["cryodayNoiseSigma"] = sigmas
table["rlnImagePixelSize"] = pixel_size
io.write_particles(snakemake.output.star, table, particles.optics)

info = {
    "input_star": str(snakemake.input.star),
    "n_particles": n,
    "n_heldout": int(heldout.sum()),
    "box": box,
    "pixel_size": pixel_size,
    "contrast_sign": int(sign),
    "contrast_detected_sign": int(contrast.sign),
    "contrast_z": float(contrast.z_score),
    "noise_sigma_median": float(np.median(sigmas)),
    "mask_radius_px": float(mask_radius),
}
with io.atomic_path(snakemake.output.info) as tmp:
    Path(tmp).write_text(json.dumps(info, indent=2))
log.info("normalised %d particles (median noise sigma %.4g); %d held out",
         n, info["noise_sigma_median"], info["n_heldout"])
