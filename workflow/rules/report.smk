rule make_report:
    input:
        unpack(seed_stage_files),
        unpack(class_inputs),
        metrics="results/{dataset}/validation/metrics.json",
        fsc="results/{dataset}/validation/fsc.tsv",
        volume="results/{dataset}/final/volume.mrc",
        star="results/{dataset}/final/particles.star",
        info="results/{dataset}/preprocess/info.json",
        particles="results/{dataset}/preprocess/particles.star",
        final_map="results/{dataset}/final/map_full.mrc",
        final_fsc="results/{dataset}/final/final_map_fsc.tsv",
        noise="results/{dataset}/preprocess/noise_spectrum.tsv",
    output:
        report(
            "results/{dataset}/report.html",
            caption="../report/report.rst",
            category="Report",
            labels={"dataset": "{dataset}"},
        ),
    log:
        "logs/make_report/{dataset}.log",
    benchmark:
        "results/{dataset}/benchmarks/make_report.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        seeds=SEEDS,
        settings=report_settings,
        n_example_particles=config["report"]["n_example_particles"],
    script:
        "../../scripts/make_report.py"
