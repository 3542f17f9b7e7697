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
        model=MANIFEST,
    output:
        manifest=ADAPTER,
    params:
        adapter=source_params("adapter"),
        adapter_dir=lambda w, output: os.path.join(os.path.dirname(output.manifest), "adapter"),
    log:
        f"logs/{RUN}/fetch_adapter.log",
    resources:
        mem_mb=4000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/fetch_adapter.py"
