import os

from layerscope.steps import prepare_dataset, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], prepare_dataset, manifest=sm.input.manifest, dataset=sm.params.dataset,
         out_dir=os.path.dirname(sm.output.ids), trust_remote_code=sm.params.trust_remote_code)
