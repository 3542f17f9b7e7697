import os

from layerscope.steps import answer_pass, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
run_step(sm.log[0], answer_pass, manifest=sm.input.manifest, adapter=sm.input.adapter,
         prompts_dir=os.path.dirname(sm.input.ids), out_dir=os.path.dirname(sm.output.ids),
         answers_out=sm.output.answers, spec=sm.params.spec, batch_size=sm.params.batch_size,
         # the device is read from the config, not params: where a job runs is no reason to re-run it
         device=sm.config["capture"]["device"], dtype=sm.params.model_dtype,
         trust_remote_code=sm.params.trust_remote_code)
