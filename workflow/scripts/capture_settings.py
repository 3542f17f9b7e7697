from layerscope.steps import run_step, write_settings

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], write_settings, settings=sm.params.settings, out=sm.output.settings)
