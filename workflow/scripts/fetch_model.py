from layerscope.steps import fetch_model, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], fetch_model, model=sm.params.model, adapter=sm.params.adapter, hub_cache=sm.params.hub_cache,
         layers=sm.params.layers, weights_dir=sm.params.weights, adapter_dir=sm.params.adapter_dir,
         manifest_out=sm.output.manifest)
