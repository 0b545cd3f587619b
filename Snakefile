# cryoday: ab initio cryo-EM reconstruction from a random start (Brubaker, Punjani & Fleet, 2015).
# Run: snakemake --cores 2            (every dataset in config.yaml, to the end)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/kernels.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/final_map.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
