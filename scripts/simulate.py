"""Rule `simulate`: a particle set from a ground-truth map by the paper's generative model."""

from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday.simulate import simulate_dataset

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/simulate.py dataset=demo
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("simulate", **argv_wildcards())

setup_logging(snakemake)
simulate_dataset(snakemake.params.simulate, star_out=snakemake.output.star,
                 stack_out=snakemake.output.stack, truth_out=snakemake.output.truth)
