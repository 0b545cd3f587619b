"""Rule `stage_stacks`: Fourier-crop the normalised particles to every stage's box in one pass."""

import json
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from _common import setup_logging

from cryoday import io, preprocess

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # run by hand: python scripts/stage_stacks.py dataset=demo
    from _common import argv_wildcards, mock_snakemake

    # With datasets of different stage counts the rule is stage_stacks_<count> (preprocess.smk).
    _wildcards = argv_wildcards()
    snakemake = mock_snakemake(_wildcards.pop("rule", "stage_stacks"), **_wildcards)

log = setup_logging(snakemake)
info = json.loads(Path(snakemake.input.info).read_text())
resolutions = [float(r) for r in snakemake.params.resolutions]
if len(resolutions) != len(snakemake.output.stacks):
    raise ValueError(f"{len(resolutions)} stage resolutions for "
                     f"{len(snakemake.output.stacks)} stage stacks")
stages = [preprocess.stage_info(info, r) for r in resolutions]
stack = io.open_stack(snakemake.input.stack)
n = len(stack)
with ExitStack() as writers:
    # Every stack is renamed into place only once the pass has filled them all.
    outs = [writers.enter_context(io.StackWriter(path, n, s["box"], s["pixel_size"])).data
            for path, s in zip(snakemake.output.stacks, stages)]
    preprocess.stage_stacks_stream(lambda rows: io.read_rows(stack, rows), n, outs,
                                   [s["box"] for s in stages],
                                   chunk_size=snakemake.params.chunk_size)
for path, s in zip(snakemake.output.infos, stages):
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(s, indent=2))
    log.info("stage at %.1f A: %d -> %d px, %.3f A/px", s["resolution_A"], s["full_box"],
             s["box"], s["pixel_size"])
