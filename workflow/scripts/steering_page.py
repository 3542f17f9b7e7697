from layerscope.steps import run_step, steering_page

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], steering_page, run_dir=sm.params.run_dir, summary=sm.input.summary, out=sm.output.page,
         examples=sm.params.examples)
