"""Rule `preprocess`: validate the particles, detect contrast, normalise, pick held-out images."""

from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday import preprocess

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/preprocess.py dataset=demo
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("preprocess", **argv_wildcards())

log = setup_logging(snakemake)
preprocess.preprocess_particles(
    snakemake.input.star,
    stack_out=snakemake.output.stack,
    star_out=snakemake.output.star,
    info_out=snakemake.output.info,
    noise_out=snakemake.output.noise,
    references=list(snakemake.input.reference),
    pixel_size=snakemake.params.pixel_size,
    **snakemake.params.options,
)
