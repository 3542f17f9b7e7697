# LayerScope: capture per-layer activations of a causal language model into a sharded Zarr v3 store.
#
#   fetch_model -> fetch_adapter -> prepare_dataset -> capture (layer block x part, each part's
#   blocks chained by the residual stream) -> store and metadata (side by side) -> summarize
#   -> dashboard
#
# The config is validated against workflow/schemas/config.schema.yaml before any job runs, and
# every key it leaves out takes the schema's documented default.

from snakemake.utils import min_version

min_version("9.0")


# The embedded demo config applies only when no --configfile is given: Snakemake would merge a
# user's file on top of it, and the demo's settings would leak into every user run.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/capture.smk"
include: "workflow/rules/store.smk"
include: "workflow/rules/metadata.smk"
include: "workflow/rules/dashboard.smk"
include: "workflow/rules/steering.smk"
include: "workflow/rules/passes.smk"


rule all:
    input:
        f"{RESULTS}/metadata.json",
        f"{RESULTS}/dashboard/index.html",
        missing_markers,
        missing_boundaries,
        steering_summaries,
        pass_targets,
    default_target: True


freeze_definitions()


onsuccess:
    end_run()


onerror:
    end_run()
