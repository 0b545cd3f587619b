rule validate:
    input:
        volume="results/{dataset}/final/volume.mrc",
        star="results/{dataset}/final/particles.star",
        choice="results/{dataset}/final/seed_choice.json",
        info="results/{dataset}/preprocess/info.json",
        seed_volumes=all_seed_volumes,
        histories=all_stage_dirs,
        reference=reference_map,
    output:
        metrics="results/{dataset}/validation/metrics.json",
        fsc="results/{dataset}/validation/fsc.tsv",
    log:
        "logs/validate/{dataset}.log",
    benchmark:
        "results/{dataset}/benchmarks/validate.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        seeds=SEEDS,
        stages_A=RECON["stages_A"],
        simulated=simulated_flag,
    script:
        "../../scripts/validate.py"
