import os

from layerscope.steps import prepare_pass, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], prepare_pass, manifest=sm.input.manifest, task=sm.params.task, spec=sm.params.spec,
         out_dir=os.path.dirname(sm.output.ids), trust_remote_code=sm.params.trust_remote_code)
