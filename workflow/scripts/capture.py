import os

from layerscope.steps import capture, run_step

sm = snakemake  # noqa: F821 - injected by Snakemake
out = dict(sm.output.items())
ins = dict(sm.input.items())
run_step(sm.log[0], capture, manifest=sm.input.manifest, adapter=sm.input.adapter,
         dataset_dir=os.path.dirname(sm.input.ids), store=sm.params.store, params=sm.params.job,
         part=int(sm.wildcards.part), markers=[v for k, v in out.items() if not k.startswith("boundary")],
         # the device is read from the config, not params: where a job runs is no reason to re-run it
         device=sm.config["capture"]["device"], group=sm.params.group, threads=sm.threads,
         boundary_in=ins.get("boundary"), boundary_out=out.get("boundary"),
         variant_boundaries={k.removeprefix("boundary_"): (ins.get(k), out.get(k))
                             for k in {*ins, *out} if k.startswith("boundary_")},
         # steer_* rules: a steered run and its vector
         steer=sm.params.get("steer"), vector=ins.get("vector"))
