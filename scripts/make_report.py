"""Rule `make_report`: one self-contained HTML page about the run."""

from typing import TYPE_CHECKING

from _common import setup_logging

if TYPE_CHECKING:
    from snakemake.script import snakemake

from cryoday import report

log = setup_logging(snakemake)
report.write_report(
    snakemake.output[0],
    dataset=snakemake.wildcards.dataset,
    metrics=snakemake.input.metrics,
    fsc=snakemake.input.fsc,
    volume=snakemake.input.volume,
    star=snakemake.input.star,
    preprocess_info=snakemake.input.info,
    histories=list(snakemake.input.histories),
    config=snakemake.params.config,
)
log.info("wrote %s", snakemake.output[0])
