rule store:
    input:
        markers=all_markers,
        ids=f"{DATASET}/token_ids.npy",
        offsets=f"{DATASET}/offsets.npy",
    output:
        root=f"{STORE}/zarr.json",
    params:
        store=lambda w, output: os.path.dirname(output.root),
        arrays=PLAN.arrays(),
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
