"""Rule `compile_kernels`: compile the stages' Numba kernels beside preprocessing."""

import json
from typing import TYPE_CHECKING

from _common import setup_logging

import cryoday
from cryoday import io
from cryoday.warmup import compile_kernels

if TYPE_CHECKING:
    from snakemake.script import snakemake
elif "snakemake" not in globals():  # by hand: python scripts/compile_kernels.py
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("compile_kernels", **argv_wildcards())

log = setup_logging(snakemake)
# The config's section (validated, defaults filled in); the rule's params name the settings
# that matter, so that only they make it run again.
seconds = compile_kernels(snakemake.config["reconstruction"], log=log.info,
                          groups=snakemake.params.symmetry)
with io.atomic_path(snakemake.output[0]) as tmp:
    tmp.write_text(json.dumps({"cryoday": cryoday.__version__, "seconds": round(seconds, 1)}))
