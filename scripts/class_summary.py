"""Rule `class_summary`: final/classes.json, each class's size, proportion and junk verdict."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday.class_results import write_class_summary

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/class_summary.py dataset=demo
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("class_summary", **argv_wildcards())

log = setup_logging(snakemake)
seeds = [int(s) for s in snakemake.params.seeds]
chosen = int(json.loads(Path(snakemake.input.choice).read_text())["chosen_seed"])
# common.smk lists every seed's last stage, in config order.
index = seeds.index(chosen)
summary = write_class_summary(snakemake.output.summary, snakemake.input.poses[index],
                              snakemake.input.classes[index], chosen)
for c in summary["classes"]:
    log.info("class %d%s: %d particles, proportion %.3f; %s", c["class"],
             " (main)" if c["main"] else "", c["size"], c["proportion"], c["junk_reason"])
