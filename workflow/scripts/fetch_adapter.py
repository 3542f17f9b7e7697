from layerscope.steps import fetch_adapter, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
adapter = sm.params.adapter
run_step(sm.log[0], fetch_adapter, adapter=adapter, model_manifest=sm.input.model,
         hub_cache=adapter["hub_cache"] if adapter else None, adapter_dir=sm.params.adapter_dir,
         manifest_out=sm.output.manifest, adapters=sm.params.adapters)
