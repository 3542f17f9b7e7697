import os

from layerscope.steps import run_step, steering_vector

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], steering_vector, spec=sm.params.spec, base_dir=os.getcwd(), run_dir=os.path.dirname(
    os.path.dirname(os.path.dirname(sm.output.vector))), num_layers=sm.params.num_layers, hidden=sm.params.hidden,
         out=sm.output.vector, info_out=sm.output.info)
