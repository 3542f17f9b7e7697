rule capture_settings:
    output:
        settings=SETTINGS,
    params:
        settings=PLAN.capture_settings(),
    log:
        f"logs/{RUN}/capture_settings.log",
    localrule: True
    conda:
        "../../environment.yml"
    script:
        "../scripts/capture_settings.py"


# One rule per block of `layers_per_job` consecutive model layers, each run once per part of the
# examples. Within a part the blocks form a chain: each starts from the residual stream the
# block below handed on. A block's params are the same for every block; what it captures is
# named by its outputs, so a change to one layer re-runs only that layer's block.
for _block in PLAN.blocks:

    rule:
        name:
            f"capture_{_block.name}"
        input:
            **capture_inputs(_block),
        output:
            **capture_outputs(_block),
        params:
            job=PLAN.job_params(_block),
            group=_block.name,
            store=lambda w, input: os.path.join(os.path.dirname(input.settings), "activations.zarr"),
        threads: capture_threads()
        log:
            f"logs/{RUN}/capture/{_block.name}_part{{part}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/capture_{_block.name}_part{{part}}.tsv"
        resources:
            mem_mb=8000,
            gpu=1 if config["capture"]["device"].startswith("cuda") else 0,
        conda:
            "../../environment.yml"
        script:
            "../scripts/capture.py"


apply_capture_overrides([f"capture_{b.name}" for b in PLAN.blocks])
