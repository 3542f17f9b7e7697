rule fetch_model:
    output:
        manifest=MANIFEST,
    params:
        model=config["model"],
        adapter=config["adapter"],
        hub_cache=config["hub_cache"],
        layers=PLAN.layers,
        weights=f"{RESULTS}/model/weights",
        adapter_dir=f"{RESULTS}/model/adapter",
    log:
        f"logs/{RUN}/fetch_model.log",
    resources:
        mem_mb=4000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/fetch_model.py"
