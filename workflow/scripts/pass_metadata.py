from layerscope.steps import pass_metadata, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], pass_metadata, config=sm.params.config, manifest=sm.input.manifest, adapter=sm.input.adapter,
         examples=sm.input.examples, store=sm.params.store, markers=list(sm.input.markers),
         answers=sm.input.answers, metadata_out=sm.output.metadata, run_metadata_out=sm.output.run_metadata,
         run_config_out=sm.output.run_config)
