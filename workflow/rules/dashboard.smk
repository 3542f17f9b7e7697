rule summarize:
    input:
        unpack(finished_run),
    output:
        summary=f"{RESULTS}/summaries/summary.json",
    params:
        run_dir=lambda w, input: os.path.dirname(input.metadata),
        dashboard=config["dashboard"],
        trust_remote_code=config["model"]["trust_remote_code"],
    log:
        f"logs/{RUN}/summarize.log",
    benchmark:
        f"{RESULTS}/benchmarks/summarize.tsv"
    # Layers are summarised in parallel, one process each (on a cluster: set-threads), each
    # holding a shard's rows as stored, widened 1 MiB at a time, and the maxima and minima of
    # each of the shard's examples.
    threads: host_cores()
    resources:
        mem_mb=lambda w, threads: 3000 + 600 * threads,
    conda:
        "../../environment.yml"
    script:
        "../scripts/summarize.py"


rule dashboard:
    input:
        summary=f"{RESULTS}/summaries/summary.json",
    output:
        html=f"{RESULTS}/dashboard/index.html",
    log:
        f"logs/{RUN}/dashboard.log",
    resources:
        mem_mb=1000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/dashboard.py"
