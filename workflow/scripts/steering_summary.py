from layerscope.steps import run_step, steering_summary

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], steering_summary, run_dir=sm.params.run_dir, target=sm.params.target, vector=sm.input.vector,
         regions=sm.params.regions, out=sm.output.summary)
