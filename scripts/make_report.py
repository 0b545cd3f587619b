"""Rule `make_report`: one self-contained HTML page about the run."""

if "snakemake" not in globals():
    from _common import argv_wildcards, mock_snakemake

    snakemake = mock_snakemake("make_report", **argv_wildcards())

from _common import setup_logging

from cryoday import report, validation

log = setup_logging(snakemake)
seeds = snakemake.params.seeds
# common.smk lists every seed's stages seed-major; regrouped into one record list per seed.
histories = validation.by_seed(snakemake.input.histories, seeds)
volumes = validation.by_seed(snakemake.input.volumes, seeds)
# Listed only with K > 1 classes: each seed's classes.npz per stage.
class_stages = getattr(snakemake.input, "class_stages", None)
class_stages = validation.by_seed(class_stages, seeds) if class_stages else None
report.write_report(
    snakemake.output[0],
    dataset=snakemake.wildcards.dataset,
    metrics=snakemake.input.metrics,
    fsc=snakemake.input.fsc,
    volume=snakemake.input.volume,
    star=snakemake.input.star,
    preprocess_info=snakemake.input.info,
    preprocessed_star=snakemake.input.particles,
    seed_stages={seed: list(zip(histories[seed], volumes[seed])) for seed in histories},
    settings=snakemake.params.settings,
    n_example_particles=int(snakemake.params.n_example_particles),
    final_map=snakemake.input.final_map,
    final_fsc=snakemake.input.final_fsc,
    noise_spectrum=snakemake.input.noise,
    class_stages=class_stages,
)
log.info("wrote %s", snakemake.output[0])
