# Prompted passes (passes:): each pass renders the task's questions through its template, answers
# them (the answer distribution, and a reply where it generates), then runs the capture chain over
# prompt + reply into its own store under results/{run}/{pass}/. Every step is its own target per
# pass, so a change to one pass's template re-runs only that pass.


wildcard_constraints:
    passname=pass_pattern(),


rule prepare_pass:
    input:
        manifest=MANIFEST,
        data=config["task"]["path"] if config["task"] else [],
    output:
        ids=f"{RESULTS}/{{passname}}/prompts/token_ids.npy",
        offsets=f"{RESULTS}/{{passname}}/prompts/offsets.npy",
        examples=f"{RESULTS}/{{passname}}/prompts/examples.jsonl",
        answer_index=f"{RESULTS}/{{passname}}/prompts/answer_index.npy",
        choices=f"{RESULTS}/{{passname}}/prompts/choices.json",
    params:
        task=config["task"],
        # what shapes the prompts; generation and positions re-run only the steps after
        spec=lambda w: {k: v for k, v in PLAN.passes[w.passname].items() if k not in ("generate", "positions")},
        trust_remote_code=config["model"]["trust_remote_code"],
    log:
        f"logs/{RUN}/{{passname}}/prepare_pass.log",
    resources:
        mem_mb=2000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/prepare_pass.py"


rule answer_pass:
    input:
        manifest=MANIFEST,
        adapter=ADAPTER,
        ids=f"{RESULTS}/{{passname}}/prompts/token_ids.npy",
        offsets=f"{RESULTS}/{{passname}}/prompts/offsets.npy",
        examples=f"{RESULTS}/{{passname}}/prompts/examples.jsonl",
        choices=f"{RESULTS}/{{passname}}/prompts/choices.json",
    output:
        ids=f"{RESULTS}/{{passname}}/dataset/token_ids.npy",
        offsets=f"{RESULTS}/{{passname}}/dataset/offsets.npy",
        examples=f"{RESULTS}/{{passname}}/dataset/examples.jsonl",
        answer_index=f"{RESULTS}/{{passname}}/dataset/answer_index.npy",
        answers=f"{RESULTS}/{{passname}}/answers.json",
    params:
        spec=lambda w: {k: v for k, v in PLAN.passes[w.passname].items() if k != "positions"},
        batch_size=config["capture"]["batch_size"],
        model_dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
    log:
        f"logs/{RUN}/{{passname}}/answer_pass.log",
    benchmark:
        f"{RESULTS}/benchmarks/answer_{{passname}}.tsv"
    resources:
        mem_mb=8000,
        gpu=1 if config["capture"]["device"].startswith("cuda") else 0,
    conda:
        "../../environment.yml"
    script:
        "../scripts/answer_pass.py"


# The capture chain of each pass: one rule per pass and block (a pass may capture at its own
# positions, which name its markers), run once per part, like the run's own chain.
for _name in PLAN.passes:
    for _block in PLAN.blocks:

        rule:
            name:
                f"pass_{_name}_{_block.name}"
            input:
                **pass_capture_inputs(_name, _block),
            output:
                **pass_capture_outputs(_name, _block),
            params:
                job=PLAN.job_params(_block),
                group=_block.name,
                # the pass's directory holds its dataset/ and its store
                store=lambda w, input: os.path.join(os.path.dirname(os.path.dirname(input.ids)), "activations.zarr"),
            threads: capture_threads()
            log:
                f"logs/{RUN}/{_name}/capture/{_block.name}_part{{part}}.log",
            benchmark:
                f"{RESULTS}/benchmarks/pass_{_name}_{_block.name}_part{{part}}.tsv"
            resources:
                mem_mb=8000,
                gpu=1 if config["capture"]["device"].startswith("cuda") else 0,
            conda:
                "../../environment.yml"
            script:
                "../scripts/capture.py"

    apply_capture_overrides([f"pass_{_name}_{b.name}" for b in PLAN.blocks])


rule store_pass:
    input:
        markers=lambda w: pass_markers(w.passname),
        ids=f"{RESULTS}/{{passname}}/dataset/token_ids.npy",
        offsets=f"{RESULTS}/{{passname}}/dataset/offsets.npy",
    output:
        root=f"{RESULTS}/{{passname}}/activations.zarr/zarr.json",
    params:
        store=lambda w, output: os.path.dirname(output.root),
        arrays=lambda w: [list(c) for b in PLAN.blocks for c in PLAN.pass_captures(b, w.passname)],
        parts=PLAN.parts,
        run=lambda w: f"{RUN}/{w.passname}",
        variant=PLAN.main_variant,
    log:
        f"logs/{RUN}/{{passname}}/store.log",
    resources:
        mem_mb=2000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/store.py"


rule pass_metadata:
    input:
        store=f"{RESULTS}/{{passname}}/activations.zarr/zarr.json",
        markers=lambda w: pass_markers(w.passname),
        answers=f"{RESULTS}/{{passname}}/answers.json",
        manifest=MANIFEST,
        adapter=ADAPTER,
        examples=f"{RESULTS}/{{passname}}/dataset/examples.jsonl",
    output:
        metadata=f"{RESULTS}/{{passname}}/metadata.json",
        run_metadata=f"{RESULTS}/{{passname}}/run_metadata.json",
        run_config=f"{RESULTS}/{{passname}}/run_config.json",
    params:
        config=lambda w: PLAN.pass_config(w.passname),
        store=lambda w, input: os.path.dirname(input.store),
    log:
        f"logs/{RUN}/{{passname}}/metadata.log",
    resources:
        mem_mb=1000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/pass_metadata.py"
