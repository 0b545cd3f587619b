"""Rule `class_outputs`: one class's map at the input box and its particles as a RELION STAR."""

from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday.finalize import class_outputs

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/class_outputs.py dataset=demo k=1
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("class_outputs", **argv_wildcards())

setup_logging(snakemake)
class_outputs(
    k=int(snakemake.wildcards.k),
    seed_classes=snakemake.input.classes,
    choice=snakemake.input.choice,
    final_star=snakemake.input.star,
    info=snakemake.input.info,
    volume_out=snakemake.output.volume,
    star_out=snakemake.output.star,
    seeds=snakemake.params.seeds,
)
