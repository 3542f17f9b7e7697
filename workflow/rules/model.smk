rule fetch_model:
    input:
        local_files(PLAN.model),
    output:
        manifest=MANIFEST,
    params:
        model=source_params("model"),
        weights=f"{RESULTS}/model/weights",
    log:
        f"logs/{RUN}/fetch_model.log",
    resources:
        mem_mb=4000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/fetch_model.py"


rule fetch_adapter:
    input:
        local_files(PLAN.adapter),
        [f for ref in PLAN.adapters.values() for f in local_files(ref)],
        model=MANIFEST,
    output:
        manifest=ADAPTER,
    params:
        adapter=source_params("adapter"),
        adapters={name: source_params("adapters", name) for name in PLAN.adapters},
        adapter_dir=lambda w, output: os.path.join(os.path.dirname(output.manifest), "adapter"),
    log:
        f"logs/{RUN}/fetch_adapter.log",
    resources:
        mem_mb=4000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/fetch_adapter.py"
