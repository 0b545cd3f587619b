rule preprocess:
    input:
        star=input_particles,
        reference=user_reference,
    output:
        star="results/{dataset}/preprocess/particles.star",
        stack="results/{dataset}/preprocess/particles.mrcs",
        info="results/{dataset}/preprocess/info.json",
        noise="results/{dataset}/preprocess/noise_spectrum.tsv",
    log:
        "logs/preprocess/{dataset}.log",
    benchmark:
        "results/{dataset}/benchmarks/preprocess.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        pixel_size=pixel_size_override,
        options=config["preprocess"],
    script:
        "../../scripts/preprocess.py"


rule downsample:
    input:
        stack="results/{dataset}/preprocess/particles.mrcs",
        info="results/{dataset}/preprocess/info.json",
    output:
        stack="results/{dataset}/preprocess/stage{stage}.mrcs",
        info="results/{dataset}/preprocess/stage{stage}.json",
    log:
        "logs/downsample/{dataset}_stage{stage}.log",
    benchmark:
        "results/{dataset}/benchmarks/downsample_stage{stage}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        resolution=stage_resolution,
        chunk_size=config["preprocess"]["chunk_size"],
    script:
        "../../scripts/downsample.py"
