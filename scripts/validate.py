"""Rule `validate`: resolution and consistency figures of the run, in metrics.json."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from _common import setup_logging

if TYPE_CHECKING:
    from snakemake.script import snakemake

from cryoday import io, validation

log = setup_logging(snakemake)
metrics, fsc_table = validation.run_metrics(
    final_volume=snakemake.input.volume,
    final_star=snakemake.input.star,
    seed_choice=snakemake.input.choice,
    preprocess_info=snakemake.input.info,
    seed_volumes=list(snakemake.input.seed_volumes),
    histories=list(snakemake.input.histories),
    seeds=[int(s) for s in snakemake.params.seeds],
    stages_A=list(snakemake.params.stages_A),
    reference=snakemake.input.reference[0] if snakemake.input.reference else None,
    simulated=bool(snakemake.params.simulated),
    log=log.info,
)
validation.write_fsc_table(snakemake.output.fsc, fsc_table)

with io.atomic_path(snakemake.output.metrics) as tmp:
    Path(tmp).write_text(json.dumps(metrics, indent=2))
log.info("metrics: %s", json.dumps({k: v for k, v in metrics.items() if k != "stages"}))
