rule final_map:
    input:
        unpack(final_map_states),
        unpack(final_map_classes),
        unpack(final_map_shards),
        star="results/{dataset}/final/particles.star",
        choice="results/{dataset}/final/seed_choice.json",
        particles="results/{dataset}/preprocess/particles.star",
        stack="results/{dataset}/preprocess/particles.mrcs",
        info="results/{dataset}/preprocess/info.json",
    output:
        full="results/{dataset}/final/map_full.mrc",
        half1="results/{dataset}/final/half1.mrc",
        half2="results/{dataset}/final/half2.mrc",
        sharpened="results/{dataset}/final/map_sharpened.mrc",
        figures="results/{dataset}/final/final_map.json",
        fsc_table="results/{dataset}/final/final_map_fsc.tsv",
    log:
        "logs/final_map/{dataset}.log",
    benchmark:
        "results/{dataset}/benchmarks/final_map.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=final_map_mem_mb,
        runtime=60,
    params:
        seeds=SEEDS,
        symmetry=final_map_symmetry,
    script:
        "../../scripts/final_map.py"


# shards > 1: each shard's particles inserted in a job of its own (cryoday.final_map.run_shard),
# added up by final_map.
rule final_map_shard:
    input:
        unpack(final_map_states),
        unpack(final_map_classes),
        star="results/{dataset}/final/particles.star",
        choice="results/{dataset}/final/seed_choice.json",
        particles="results/{dataset}/preprocess/particles.star",
        stack="results/{dataset}/preprocess/particles.mrcs",
        info="results/{dataset}/preprocess/info.json",
    output:
        temp("results/{dataset}/final/shards/sums_{shard}_of_{n_shards}.npz"),
    log:
        "logs/final_map_shard/{dataset}_{shard}_of_{n_shards}.log",
    benchmark:
        "results/{dataset}/benchmarks/final_map_shard_{shard}_of_{n_shards}.tsv"
    wildcard_constraints:
        shard=r"\d+",
        n_shards=r"\d+",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=final_map_mem_mb,
        runtime=60,
    params:
        seeds=SEEDS,
        symmetry=final_map_symmetry,
    script:
        "../../scripts/final_map_shard.py"
