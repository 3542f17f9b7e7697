# LayerScope: capture per-layer activations of a causal language model into a sharded Zarr v3 store.
#
#   fetch_model -> prepare_dataset -> capture (layer group x part) -> store -> metadata
#               -> summarize -> dashboard
#
# The config is validated against workflow/schemas/config.schema.yaml before any job runs.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/dataset.smk"
include: "workflow/rules/capture.smk"
include: "workflow/rules/store.smk"
include: "workflow/rules/metadata.smk"
include: "workflow/rules/dashboard.smk"


rule all:
    input:
        f"{RESULTS}/metadata.json",
        f"{RESULTS}/dashboard/index.html",
        # Snakemake does not re-create missing intermediate files when what depends on them is
        # up to date; naming the per-array markers here makes a deleted array re-run its job.
        all_markers,
    default_target: True
