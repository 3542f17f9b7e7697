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
