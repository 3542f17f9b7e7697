from layerscope.steps import run_step, summarize

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], summarize, run_dir=sm.params.run_dir, dashboard=sm.params.dashboard, out=sm.output.summary,
         trust_remote_code=sm.params.trust_remote_code, threads=sm.threads)
