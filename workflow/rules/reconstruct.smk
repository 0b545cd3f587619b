rule reconstruct_stage:
    input:
        stack="results/{dataset}/preprocess/stage{stage}.mrcs",
        info="results/{dataset}/preprocess/stage{stage}.json",
        particles="results/{dataset}/preprocess/particles.star",
        noise=stage_noise,
        previous=previous_stage,
        kernels=ancient("results/kernels/warmup.json"),
    output:
        initial="results/{dataset}/abinitio/seed{seed}/stage{stage}/initial.mrc",
        volume="results/{dataset}/abinitio/seed{seed}/stage{stage}/volume.mrc",
        state="results/{dataset}/abinitio/seed{seed}/stage{stage}/state.npz",
        history="results/{dataset}/abinitio/seed{seed}/stage{stage}/history.tsv",
        poses="results/{dataset}/abinitio/seed{seed}/stage{stage}/poses.npz",
        noise="results/{dataset}/abinitio/seed{seed}/stage{stage}/noise_spectrum.tsv",
        classes="results/{dataset}/abinitio/seed{seed}/stage{stage}/classes.npz",
    log:
        "logs/reconstruct_stage/{dataset}_seed{seed}_stage{stage}.log",
    benchmark:
        "results/{dataset}/benchmarks/reconstruct_seed{seed}_stage{stage}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=stage_mem_mb,
        runtime=stage_runtime,
    params:
        resolution=stage_resolution,
        options=stage_options,
        last_stage=lambda w: int(w.stage) == len(dataset_stages(w.dataset)),
        refine_rounds=stage_refine_rounds,
        checkpoint="results/{dataset}/abinitio/seed{seed}/stage{stage}/checkpoint.npz",
    script:
        "../../scripts/reconstruct_stage.py"


rule finalize:
    input:
        unpack(last_stage_files),
        source=input_particles,
        info="results/{dataset}/preprocess/info.json",
    output:
        volume="results/{dataset}/final/volume.mrc",
        star="results/{dataset}/final/particles.star",
        cs="results/{dataset}/final/particles.cs",
        choice="results/{dataset}/final/seed_choice.json",
    log:
        "logs/finalize/{dataset}.log",
    benchmark:
        "results/{dataset}/benchmarks/finalize.tsv"
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        seeds=SEEDS,
    script:
        "../../scripts/finalize.py"


rule class_summary:
    input:
        unpack(class_records),
        choice="results/{dataset}/final/seed_choice.json",
    output:
        summary="results/{dataset}/final/classes.json",
    log:
        "logs/class_summary/{dataset}.log",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        seeds=SEEDS,
    script:
        "../../scripts/class_summary.py"


rule class_outputs:
    input:
        unpack(class_records),
        choice="results/{dataset}/final/seed_choice.json",
        star="results/{dataset}/final/particles.star",
        info="results/{dataset}/preprocess/info.json",
    output:
        volume="results/{dataset}/final/class{k}/volume.mrc",
        star="results/{dataset}/final/class{k}/particles.star",
    log:
        "logs/class_outputs/{dataset}_class{k}.log",
    wildcard_constraints:
        k=r"[1-9]\d*",
    localrule: True
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        seeds=SEEDS,
    script:
        "../../scripts/class_outputs.py"
