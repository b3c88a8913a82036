"""The seeds' recipes: each loads, resolves its stage graph and renders manifests that the
schema (strictly) and the Kubernetes client's own request models accept; a tiny variant of
each runs end to end on CPU."""

from __future__ import annotations

import sys

import kubernetes_validate
import pytest

from jobs.contract import require_finished
from pipeline.charts import client_model, render_stage
from pipeline.config import plan
from tests import warm
from tests.conftest import ROOT

RECIPES = {
    "vaiv-korean": ["data", "sft", "reward", "ppo", "judge", "evaluate"],
    "stablevicuna": ["data", "sft", "reward", "ppo"],
    "sakura-solar": ["merge", "data", "dpo"],
    "openchat": ["data", "crlft"],
    "grpo-gsm8k": ["data", "grpo"],
}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_and_renders_valid_manifests(name):
    the_plan = plan(str(ROOT / "examples" / f"{name}.yaml"))
    assert [s.name for s in the_plan.stages] == RECIPES[name]
    for stage in the_plan.stages:
        for needed in stage.needs:
            assert needed in RECIPES[name][: RECIPES[name].index(stage.name)]
        for doc in render_stage(the_plan, stage):
            for version in ("1.29.0", kubernetes_validate.latest_version()):
                kubernetes_validate.validate(doc, version, strict=True)
            # what the submitter sends: the client refused the GPU recipes' integer limits,
            # which the schema accepts
            client_model(doc)


# StableVicuna's graph (data, sft, reward, ppo) is part of VAIV's; its own pieces (ShareGPT
# and HH readers, the chat template, packing, adaptive KL) have tests of their own. The tiny
# VAIV recipe is the demo pipeline (examples/demo.yaml, run whole by
# tests/integration/test_ppo.py) without generate and label. Both are left out of the
# end-to-end runs for the suite's time; rendered above.
END_TO_END = [name for name in RECIPES if name not in ("stablevicuna", "vaiv-korean")]


@pytest.mark.slow
@pytest.mark.parametrize("name", END_TO_END)
def test_tiny_variant_runs_end_to_end(name, tmp_path):
    result = warm.run(  # its stages forked warm too (tests/warm.py)
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            f"examples/tiny/{name}.yaml",
            "--store",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tiny_plan = plan(str(ROOT / "examples" / "tiny" / f"{name}.yaml"), store_uri=str(tmp_path))
    recipe = plan(str(ROOT / "examples" / f"{name}.yaml"))
    # The recipe's stages (by kind: its judge is a reward stage), each one run.
    assert {s.stage for s in recipe.stages} <= {s.stage for s in tiny_plan.stages}
    for stage in tiny_plan.stages:
        require_finished(stage.output)
