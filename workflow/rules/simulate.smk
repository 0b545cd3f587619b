rule simulate:
    output:
        star="results/{dataset}/simulated/particles.star",
        stack="results/{dataset}/simulated/particles.mrcs",
        truth="results/{dataset}/simulated/truth.mrc",
    log:
        "logs/simulate/{dataset}.log",
    benchmark:
        "results/{dataset}/benchmarks/simulate.tsv"
    # Before compile_kernels, which would otherwise hold one of two cores and make it wait.
    priority: 1
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        simulate=simulate_params,
    script:
        "../../scripts/simulate.py"
