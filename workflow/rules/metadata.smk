rule metadata:
    input:
        store=f"{STORE}/zarr.json",
        variants=variant_stores,
        manifest=MANIFEST,
        adapter=ADAPTER,
        examples=f"{DATASET}/examples.jsonl",
    output:
        metadata=f"{RESULTS}/metadata.json",
        run_config=f"{RESULTS}/run_config.json",
    params:
        config=PLAN.recorded_config(),
        store=lambda w, input: os.path.dirname(input.store),
    log:
        f"logs/{RUN}/metadata.log",
    resources:
        mem_mb=1000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/metadata.py"
