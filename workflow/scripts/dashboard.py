from layerscope.steps import dashboard, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], dashboard, summary=sm.input.summary, out=sm.output.html)
