import os

from layerscope.steps import capture, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], capture, manifest=sm.input.manifest, dataset_dir=os.path.dirname(sm.input.ids),
         store=sm.params.store, params=sm.params.job, part=int(sm.wildcards.part), device=sm.params.device,
         group=sm.params.group)
