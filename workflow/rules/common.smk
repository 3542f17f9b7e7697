import os
from pathlib import Path
import sys

from snakemake.exceptions import WorkflowError

try:
    from layerscope.config import build_plan
    from layerscope.errors import LayerScopeError
    from layerscope.store import marker_path
except ImportError as e:
    raise WorkflowError(
        f"the layerscope package is not importable ({e}); install it first: pip install -e ."
    )

try:
    PLAN = build_plan(
        config,
        schema_path=os.path.join(workflow.basedir, "workflow/schemas/config.schema.yaml"),
        base_dir=os.getcwd(),
    )
except LayerScopeError as e:
    # One message naming the key and the problem, before any job runs.
    raise WorkflowError(str(e))

config = PLAN.config
RUN = config["run"]
RESULTS = f"results/{RUN}"
STORE = f"{RESULTS}/activations.zarr"
MANIFEST = f"{RESULTS}/model/manifest.json"
DATASET = f"{RESULTS}/dataset"


wildcard_constraints:
    part=r"\d+",


def capture_outputs(layers):
    """Completion markers of one capture job: one per array x part, inside the array."""
    return [
        str(marker_path(STORE, L, s, "{part}"))
        for L in layers
        for s in PLAN.settings[L]["sites"]
    ]


def all_markers(wildcards):
    return [
        str(marker_path(STORE, L, s, p))
        for L, s in PLAN.arrays()
        for p in range(PLAN.parts)
    ]
