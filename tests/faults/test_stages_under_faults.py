"""The stages the kill tests leave out, run whole with their inputs and outputs in S3 behind
the fault proxy: a pipeline of bootstrap, data, reward, crlft, sft, merge, generate, label
and evaluate, run once on a healthy store and once more from nothing while the first write of
every stage is answered with a 500, the first read of every finished output has its
connection reset, and about one request in twenty meets a random fault. Every stage ends
with the fault-free run's files: byte for byte, but for the timings in the metrics and the
TensorBoard event files (named by host, process and time; counted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from jobs import store
from tests import warm
from tests.conftest import ROOT
from tests.faults.conftest import noise, record, timing
from tests.faults.proxy import Rule

pytestmark = pytest.mark.slow

MODEL = "${bootstrap.output}/model"


def trained() -> dict:
    """reward, crlft and sft: two steps on the data stage's output (a dict of its own each,
    which YAML writes out whole rather than as an alias)."""
    return {
        "model": MODEL,
        "data": "${data.output}",
        "max_seq_len": 64,
        "max_steps": 2,
        "train": {"micro_batch_size": 8},
    }


PIPELINE = {
    "name": "faults",
    "stages": {
        "bootstrap": {"config": {"daily_per_lang": 60, "hate_per_lang": 30, "task_examples": 10}},
        "data": {
            "config": {
                "template": "raw",
                "dedup_threshold": None,
                "eval_fraction": 0.2,
                "sources": [
                    {
                        "name": "sharegpt",
                        "format": "sharegpt",
                        "uri": "${bootstrap.output}/data/sharegpt.json",
                        "label_field": "model",
                    },
                    {
                        "name": "pairs",
                        "format": "pairs",
                        "uri": "${bootstrap.output}/data/pairs.jsonl",
                    },
                ],
            }
        },
        "reward": {"config": trained()},
        "crlft": {"config": trained()},
        "sft": {"config": trained()},
        "merge": {"config": {"base": MODEL, "other": "${sft.output}/model", "t": 0.5}},
        "generate": {
            "config": {
                "prompts": "${data.output}",
                "max_prompts": 6,
                "samples_per_source": 2,
                "sources": [{"name": "merged", "model": "${merge.output}/model"}],
                "sampling": {"max_new_tokens": 8},
            }
        },
        "label": {
            "config": {
                "candidates": "${generate.output}",
                "method": "reward_model",
                "reward_model": "${reward.output}/model",
            }
        },
        "evaluate": {
            "config": {
                "prompts": "${data.output}",
                "candidate": "${merge.output}/model",
                "baseline": MODEL,
                "reward_model": "${reward.output}/model",
                "max_prompts": 6,
                "sampling": {"max_new_tokens": 8},
            }
        },
    },
}
STAGES = list(PIPELINE["stages"])


def run_pipeline(
    runs: str, tmp_path: Path, name: str, fresh: bool = False
) -> subprocess.CompletedProcess:
    """The pipeline through `rlhf run` (forked warm with its stages unless ``fresh``:
    tests/warm.py)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(PIPELINE))
    command = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--store", runs]
    return warm.run(
        [*command, "--run-id", "r"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        # each run on empty scratch, as on new pods: nothing is reused from the first
        env={**os.environ, "KUBERLHF_WORKDIR": str(tmp_path / f"work-{name}")},
        fresh=fresh,
    )


def contents(folder: Path) -> dict[str, object]:
    """What a stage output holds, as the two runs must agree on it: every file's bytes,
    the metric lines and the manifest's files and metrics without what measures the clock,
    and how many event files (TensorBoard names them by host, process and time)."""
    out: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith("tensorboard/"):
            out["event files"] = out.get("event files", 0) + 1
        elif rel == "metrics.jsonl":
            lines = [json.loads(x) for x in path.read_text().splitlines()]
            out[rel] = [{k: v for k, v in m.items() if not timing(k)} for m in lines]
        elif rel == "manifest.json":
            manifest = json.loads(path.read_text())
            out["manifest files"] = {
                f["path"]: f["sha256"]
                for f in manifest["files"]
                if not f["path"].startswith("tensorboard/") and f["path"] != "metrics.jsonl"
            }
            out["manifest metrics"] = {
                k: v for k, v in manifest["metrics"].items() if not timing(k)
            }
        else:
            out[rel] = path.read_bytes()
    return out


def test_every_other_stage_under_s3_faults_ends_with_a_fault_free_runs_files(
    proxy, s3_env, tmp_path
):
    runs = f"{s3_env}/runs"
    # fresh: the run it is compared with is forked, and forks share a hash seed
    clean = run_pipeline(runs, tmp_path, "clean", fresh=True)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    expected = {}
    for stage in STAGES:
        store.download_dir(f"{runs}/r/{stage}", tmp_path / "a" / stage)
        expected[stage] = contents(tmp_path / "a" / stage)
    store.delete(runs)  # the same run again, from nothing

    targeted = [Rule("500", "PUT|POST", rf"/runs/r/{stage}/", nth=1) for stage in STAGES]
    targeted += [Rule("reset", "GET", rf"/runs/r/{stage}/.", nth=1) for stage in STAGES]
    proxy.events.clear()
    proxy.set_rules(*targeted, *noise())
    noisy = run_pipeline(runs, tmp_path, "noisy")
    proxy.set_rules()
    assert noisy.returncode == 0, noisy.stdout[-3000:] + noisy.stderr[-3000:]
    assert [rule.fired for rule in targeted] == [1] * len(targeted)
    for stage in STAGES:
        store.download_dir(f"{runs}/r/{stage}", tmp_path / "b" / stage)
        got = contents(tmp_path / "b" / stage)
        assert got.keys() == expected[stage].keys(), stage
        for key, value in expected[stage].items():
            assert got[key] == value, (stage, key)

    faults = Counter(e.kind for e in proxy.events)
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(faults.items()))
    record(
        f"500 on each stage's first write, reset on the first read of each output; in all {listed}",
        ", ".join(STAGES),
        "retried: the fault-free run's files",
    )
