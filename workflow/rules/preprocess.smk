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
    # Reading and writing the stack, on one core: the other compiles the kernels meanwhile.
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        pixel_size=pixel_size_override,
        options=config["preprocess"],
    script:
        "../../scripts/preprocess.py"


# One pass over the normalised stack writes every stage's crop (see stage_stack_groups).
for _rule_name, (_n_stages, _names) in stage_stack_groups().items():

    rule:
        name:
            _rule_name
        input:
            stack="results/{dataset}/preprocess/particles.mrcs",
            info="results/{dataset}/preprocess/info.json",
        output:
            stacks=expand(
                "results/{{dataset}}/preprocess/stage{k}.mrcs",
                k=range(1, _n_stages + 1),
            ),
            infos=expand(
                "results/{{dataset}}/preprocess/stage{k}.json",
                k=range(1, _n_stages + 1),
            ),
        log:
            "logs/stage_stacks/{dataset}.log",
        benchmark:
            "results/{dataset}/benchmarks/stage_stacks.tsv"
        wildcard_constraints:
            dataset="|".join(_names),
        conda:
            ENV
        # One core, as preprocess.
        threads: 1
        resources:
            mem_mb=2000,
            runtime=120,
        params:
            resolutions=dataset_stages_A,
            chunk_size=config["preprocess"]["chunk_size"],
        script:
            "../../scripts/stage_stacks.py"
