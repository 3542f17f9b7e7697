rule store:
    input:
        markers=all_markers,
        ids=f"{DATASET}/token_ids.npy",
        offsets=f"{DATASET}/offsets.npy",
    output:
        root=f"{STORE}/zarr.json",
    params:
        store=lambda w, output: os.path.dirname(output.root),
        arrays=[list(c) for b in PLAN.blocks for c in PLAN.captures(b)],
        variant=PLAN.main_variant,
        parts=PLAN.parts,
        run=RUN,
    log:
        f"logs/{RUN}/store.log",
    resources:
        mem_mb=2000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/store.py"


# A variant's store beside the main one (capture.variants), e.g. activations.base.zarr, or a
# steered run's (activations.steer-{target}.zarr).
rule store_variant:
    input:
        markers=all_markers,
        ids=f"{DATASET}/token_ids.npy",
        offsets=f"{DATASET}/offsets.npy",
    output:
        root=f"{RESULTS}/activations.{{variant}}.zarr/zarr.json",
    wildcard_constraints:
        variant=variant_pattern(),
    params:
        store=lambda w, output: os.path.dirname(output.root),
        arrays=lambda w: [
            list(c)
            for b in (
                PLAN.steered_blocks(w.variant.removeprefix("steer-"))
                if w.variant.startswith("steer-")
                else PLAN.blocks
            )
            for c in PLAN.captures(b, w.variant)
        ],
        parts=PLAN.parts,
        run=RUN,
        variant=lambda w: w.variant,
    log:
        f"logs/{RUN}/store_{{variant}}.log",
    resources:
        mem_mb=2000,
    conda:
        "../../environment.yml"
    script:
        "../scripts/store.py"
