# Steered runs (steering.runs): each concept x layer x strength is its own chain of capture jobs,
# from the block holding its layer up, starting from the normal run's boundary into that block;
# so adding one strength runs only its jobs. Vectors and summaries are cached targets too.


wildcard_constraints:
    target=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    concept=r"[A-Za-z0-9][A-Za-z0-9_.-]*",


rule steering_vector:
    input:
        unpack(vector_inputs),
    output:
        vector=f"{RESULTS}/steering/vectors/{{concept}}.npy",
        info=f"{RESULTS}/steering/vectors/{{concept}}.json",
    params:
        spec=lambda w: config["steering"]["vectors"][w.concept],
        num_layers=PLAN.dims.num_layers,
        hidden=PLAN.dims.hidden_size,
    log:
        f"logs/{RUN}/steering/vector_{{concept}}.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/steering_vector.py"


for _block in PLAN.blocks:

    rule:
        name:
            f"steer_{_block.name}"
        input:
            unpack(steer_inputs(_block)),
        output:
            **steer_outputs(_block),
        params:
            job=PLAN.job_params(_block),
            group=_block.name,
            steer=lambda w: PLAN.target(w.target).params(),
            store=lambda w: f"{RESULTS}/activations.steer-{w.target}.zarr",
        threads: capture_threads()
        log:
            f"logs/{RUN}/steering/{{target}}/{_block.name}_part{{part}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/steer_{{target}}_{_block.name}_part{{part}}.tsv"
        resources:
            mem_mb=8000,
            gpu=1 if config["capture"]["device"].startswith("cuda") else 0,
        conda:
            "../../environment.yml"
        script:
            "../scripts/capture.py"


# A profile's settings for `capture` (threads, memory, GPUs) apply to steered capture jobs too.
apply_capture_overrides([f"steer_{b.name}" for b in PLAN.blocks])


rule steering_summary:
    input:
        unpack(finished_run),
        store=f"{RESULTS}/activations.steer-{{target}}.zarr/zarr.json",
        vector=lambda w: f"{RESULTS}/steering/vectors/{PLAN.target(w.target).concept}.npy",
    output:
        summary=f"{RESULTS}/steering/{{target}}/summary.json",
    params:
        target=lambda w: PLAN.target(w.target).params(),
        regions=config["steering"]["regions"],
        run_dir=lambda w, input: os.path.dirname(input.metadata),
    log:
        f"logs/{RUN}/steering/{{target}}/summary.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/steering_summary.py"


rule steering_generate:
    input:
        manifest=MANIFEST,
        adapter=ADAPTER,
        ids=f"{DATASET}/token_ids.npy",
        examples=f"{DATASET}/examples.jsonl",
        vector=lambda w: f"{RESULTS}/steering/vectors/{PLAN.target(w.target).concept}.npy",
    output:
        generations=f"{RESULTS}/steering/{{target}}/generations.jsonl",
    params:
        target=lambda w: PLAN.target(w.target).params(),
        generate=config["steering"]["generate"],
        model_dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
    log:
        f"logs/{RUN}/steering/{{target}}/generate.log",
    resources:
        mem_mb=8000,
        gpu=1 if config["capture"]["device"].startswith("cuda") else 0,
    conda:
        "../../environment.yml"
    script:
        "../scripts/steering_generate.py"


rule steering_page:
    input:
        unpack(finished_run),
        summary=f"{RESULTS}/steering/{{target}}/summary.json",
    output:
        page=f"{RESULTS}/steering/{{target}}/index.html",
    params:
        run_dir=lambda w, input: os.path.dirname(input.metadata),
        examples=config["dashboard"]["heatmap_examples"],
    log:
        f"logs/{RUN}/steering/{{target}}/page.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/steering_page.py"
