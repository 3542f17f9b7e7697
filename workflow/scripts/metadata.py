from layerscope.steps import metadata, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], metadata, config=sm.params.config, manifest=sm.input.manifest, adapter=sm.input.adapter,
         examples=sm.input.examples, store=sm.params.store, markers=list(sm.input.markers),
         metadata_out=sm.output.metadata, run_config_out=sm.output.run_config)
