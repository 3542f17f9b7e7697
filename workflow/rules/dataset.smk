rule prepare_dataset:
    input:
        manifest=MANIFEST,
        data=config["dataset"]["path"],
    output:
        ids=f"{DATASET}/token_ids.npy",
        offsets=f"{DATASET}/offsets.npy",
        examples=f"{DATASET}/examples.jsonl",
    params:
        # the name is only recorded in metadata.json: renaming re-runs nothing else
        dataset={k: v for k, v in config["dataset"].items() if k != "name"},
        trust_remote_code=config["model"]["trust_remote_code"],
    log:
        f"logs/{RUN}/prepare_dataset.log",
    resources:
        mem_mb=2000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/prepare_dataset.py"
