from layerscope.steps import fetch_model, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], fetch_model, model=sm.params.model, hub_cache=sm.params.model["hub_cache"],
         weights_dir=sm.params.weights, manifest_out=sm.output.manifest)
