import os

from layerscope.steps import run_step, store

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], store, store=sm.params.store, arrays=sm.params.arrays, parts=sm.params.parts,
         dataset_dir=os.path.dirname(sm.input.ids), run=sm.params.run, variant=sm.params.variant)
