# Numba compiles a fresh install's kernels on first use: 77 s on a cold cache, most of it in the
# first stages. This job compiles them on one core while preprocessing and the crops (mostly
# file reading and writing) run beside it, and every stage waits for it (cryoday/warmup.py).
# ancient(): its marker never makes finished stages rerun.


rule compile_kernels:
    output:
        "results/kernels/warmup.json",
    log:
        "logs/compile_kernels.log",
    benchmark:
        "results/kernels/benchmark.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    # Only what changes the kernels' types: a new seed or stage must not make it run again.
    params:
        classes=config["reconstruction"]["classes"],
        # Every dataset's group (its own symmetry: key included): the final map's lookup
        # compiles when any of them is one.
        symmetry=sorted({dataset_symmetry(name) for name in DATASETS}),
    script:
        "../../scripts/compile_kernels.py"
