"""The Kubernetes Job runs exactly what the local backend runs: one source, the chart."""

from __future__ import annotations

import json
import subprocess

import yaml

from jobs import store
from pipeline.backends.local import LocalBackend
from pipeline.charts import launch_of, pod_template, render_stage
from pipeline.config import plan


def test_container_command_and_env_are_what_the_local_backend_used(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "agree",
                "store": str(tmp_path / "runs"),
                "kubernetes": {"namespace": "ml", "values": {"s3": {"existingSecret": "s3"}}},
                "stages": {
                    "bootstrap": {
                        "config": {"daily_per_lang": 40, "hate_per_lang": 20, "vocab_size": 400}
                    }
                },
            }
        )
    )
    the_plan = plan(str(path))
    [stage] = the_plan.stages

    manifests = render_stage(the_plan, stage)
    container = pod_template(manifests)["spec"]["containers"][0]
    [config_map] = [m for m in manifests if m["kind"] == "ConfigMap"]

    calls = []

    def recording_run(argv, env):
        calls.append((argv, env))
        return subprocess.run(argv, env=env)

    LocalBackend(runner=recording_run, echo=lambda _: None).run(the_plan)
    [(argv, env)] = calls

    assert (
        argv
        == container["command"] + container.get("args", [])
        == ["python", "-m", "jobs", "bootstrap"]
    )
    pod_env = {e["name"]: e.get("value") for e in container["env"]}
    launch_env = launch_of(manifests)["env"]
    assert launch_env and all(
        env[name] == pod_env[name] == value for name, value in launch_env.items()
    )
    # The one deliberate difference: the config comes from a ConfigMap in the pod and from
    # the store locally, and it is the same config.
    assert pod_env["KUBERLHF_CONFIG"] == "/etc/kuberlhf/config.json"
    assert json.loads(store.read_text(env["KUBERLHF_CONFIG"])) == json.loads(
        config_map["data"]["config.json"]
    )
    # What else the pod sets is about the pod: paths into its volumes, S3 from the Secret.
    pod_only = set(pod_env) - set(launch_env) - {"KUBERLHF_CONFIG"}
    assert pod_only == {
        "KUBERLHF_IMAGE",
        "HOME",
        "TMPDIR",
        "HF_HOME",
        "KUBERLHF_WORKDIR",
        "AWS_REGION",
        "KUBERLHF_S3_ADDRESSING_STYLE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }
    assert (tmp_path / "runs" / "agree" / "bootstrap" / "manifest.json").is_file()


def test_torchrun_launch_is_the_same_for_both(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "agree",
                "store": str(tmp_path / "runs"),
                "stages": {"sft": {"nproc_per_node": 4, "config": {"model": "m", "data": "d"}}},
            }
        )
    )
    the_plan = plan(str(path))
    from pipeline.launch import stage_launch

    launch = stage_launch(the_plan, the_plan.stages[0])
    container = pod_template(render_stage(the_plan, the_plan.stages[0]))["spec"]["containers"][0]
    assert launch.argv == container["command"] == ["python", "-m", "jobs.launch", "sft"]
    assert launch.env["PET_NPROC_PER_NODE"] == "4" and launch.env["PET_STANDALONE"] == "1"


def test_render_prints_every_manifest_a_run_creates_and_they_validate(tmp_path, capsys):
    import kubernetes_validate

    from pipeline.cli import main

    assert main(["render", "examples/demo-k8s.yaml", "--run-id", "r1"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == [
        ("ConfigMap", "r1-bootstrap-config"),
        ("ConfigMap", "r1-data-config"),
        ("ConfigMap", "r1-sft-config"),
        ("Job", "r1-bootstrap"),
        ("Job", "r1-data"),
        ("Job", "r1-sft"),
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)
    # The demo is for CPU nodes (kind): no pod may wait for a GPU there.
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)


def test_status_reads_the_run_from_the_store(tmp_path, capsys):
    from pipeline.cli import main

    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "st",
                "store": str(tmp_path / "runs"),
                "stages": {
                    "bootstrap": {
                        "config": {"daily_per_lang": 40, "hate_per_lang": 20, "vocab_size": 400}
                    },
                    "data": {
                        "config": {
                            "sources": [
                                {
                                    "name": "d",
                                    "format": "alpaca",
                                    "uri": "${bootstrap.output}/data/sft_daily.jsonl",
                                }
                            ]
                        }
                    },
                },
            }
        )
    )
    assert main(["run", str(path), "--only", "bootstrap"]) == 0
    capsys.readouterr()
    assert main(["status", "st", "--store", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["bootstrap", "finished"] and "dialogues=120" in lines[0]
    assert lines[1].split() == ["data", "pending"]
