# One rule per group of consecutive layers, each run once per part of the examples:
# changing one layer's settings changes only its group's params, so only that group re-runs.
for _group, _layers in PLAN.groups.items():

    rule:
        name:
            f"capture_{_group}"
        input:
            manifest=MANIFEST,
            ids=f"{DATASET}/token_ids.npy",
            offsets=f"{DATASET}/offsets.npy",
        output:
            capture_outputs(_layers),
        params:
            job=PLAN.job_params(_group),
            group=_group,
            store=lambda w, output: str(Path(output[0]).parents[3]),
            device=config["capture"]["device"],
        log:
            f"logs/{RUN}/capture/{_group}_part{{part}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/capture_{_group}_part{{part}}.tsv"
        resources:
            mem_mb=8000,
            gpu=1 if config["capture"]["device"].startswith("cuda") else 0,
        conda:
            "../../environment.yml"
        script:
            "../scripts/capture.py"
