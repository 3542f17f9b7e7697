import os

from layerscope.steps import run_step, steering_generate

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], steering_generate, manifest=sm.input.manifest, adapter=sm.input.adapter,
         dataset_dir=os.path.dirname(sm.input.ids), target=sm.params.target, vector=sm.input.vector,
         examples=sm.params.generate["examples"], max_new_tokens=sm.params.generate["max_new_tokens"],
         device=sm.config["capture"]["device"], dtype=sm.params.model_dtype,
         trust_remote_code=sm.params.trust_remote_code, out=sm.output.generations)
