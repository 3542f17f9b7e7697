# Beside the store's finalization, not after it: the arrays' records come from the capture jobs'
# markers and zarr.json files, so metadata.json is no sign that the store is finished (finished_run).
rule metadata:
    input:
        markers=all_markers,
        manifest=MANIFEST,
        adapter=ADAPTER,
        examples=f"{DATASET}/examples.jsonl",
    output:
        metadata=f"{RESULTS}/metadata.json",
        run_config=f"{RESULTS}/run_config.json",
    params:
        config=PLAN.recorded_config(),
        store=STORE,
    log:
        f"logs/{RUN}/metadata.log",
    resources:
        mem_mb=1000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/metadata.py"
