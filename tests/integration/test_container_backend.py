"""The job image, built on this machine (images/localbuild.py), runs bootstrap, data and
sft as containers through the container backend: the command, environment, user and
volumes of the rendered Jobs, a read-only root file system, the local S3 server.

Skipped where podman, debootstrap or root is missing (`make test` installs the first two
on Debian). A broken image (a dependency left out, a file the stages need missing) fails
here: a stage exits non-zero or writes no manifest.
"""

from __future__ import annotations

import select
import subprocess

import pytest
import yaml

from images import localbuild
from jobs.contract import download_finished, read_manifest
from pipeline.backends.container import container_command
from pipeline.charts import pod_template, render_stage
from pipeline.cli import main
from pipeline.config import plan
from tests.integration.test_secrets import bucket_objects, canaries, leaks

pytestmark = pytest.mark.skipif(
    bool(localbuild.missing()),
    reason=f"needs {', '.join(localbuild.missing())} to build and run the job image "
    "(the Makefile installs podman and debootstrap on Debian)",
)


@pytest.fixture(scope="module")
def job_image():
    """Built (or brought up to date: podman's layer cache keeps the dependencies) once."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in localbuild.env().items():
            patch.setenv(name, value)
        yield localbuild.build().image


def pipeline_file(tmp_path, s3_env: str, endpoint: str, image: str):
    repository, tag = image.rsplit(":", 1)
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "boxed",
                "store": f"{s3_env}/runs",
                "kubernetes": {
                    "values": {
                        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
                        "gpus": 0,
                        "s3": {
                            "existingSecret": "s3-credentials",
                            "endpoint": endpoint,
                            "addressingStyle": "path",
                        },
                    }
                },
                "stages": {
                    "bootstrap": {
                        "config": {"daily_per_lang": 60, "hate_per_lang": 30, "vocab_size": 400}
                    },
                    "data": {
                        "config": {
                            "tokenizer": "${bootstrap.output}/model",
                            "dedup_threshold": 0.95,
                            "sources": [
                                {
                                    "name": "daily",
                                    "format": "alpaca",
                                    "uri": "${bootstrap.output}/data/sft_daily.jsonl",
                                    "ratio": 2,
                                },
                                {
                                    "name": "hate",
                                    "format": "alpaca",
                                    "uri": "${bootstrap.output}/data/sft_hate.jsonl",
                                    "ratio": 1,
                                },
                            ],
                        }
                    },
                    "sft": {
                        "config": {
                            "model": "${bootstrap.output}/model",
                            "data": "${data.output}",
                            "max_seq_len": 96,
                            "max_steps": 12,
                            "eval_every": 6,
                            "train": {"learning_rate": 3.0e-3, "micro_batch_size": 8},
                        }
                    },
                },
            }
        )
    )
    return plan(str(path))


def test_stages_run_as_containers_from_the_image(
    job_image, s3_env, s3_server, tmp_path, capfd, monkeypatch
):
    markers = canaries(monkeypatch)  # the Secret's values the containers get: never seen
    the_plan = pipeline_file(tmp_path, s3_env, s3_server, job_image)
    command = ["run", the_plan.source, "--backend", "container", "--engine", "podman"]

    assert main(command) == 0

    captured = capfd.readouterr()  # the containers' logs too: podman writes to these fds
    printed = captured.out
    assert '"stage": "sft"' in printed
    objects = bucket_objects(s3_server, s3_env.removeprefix("s3://"))
    places = {"rlhf run output": printed + captured.err, **objects}
    assert leaks(markers, places) == []
    assert f"[3/3] sft: podman container boxed-sft from {job_image}" in printed
    results = {stage.name: read_manifest(stage.output) for stage in the_plan.stages}
    for name, manifest in results.items():
        # Written from inside the image (the chart's KUBERLHF_IMAGE), complete and intact:
        # every file is downloaded and checked against its sha256.
        assert manifest.image == job_image
        assert manifest.code_version == "0.1.0"
        finished = download_finished(manifest.config["output"], tmp_path / name)
        assert finished.files and all((tmp_path / name / f.path).is_file() for f in finished.files)
    assert results["data"].metrics["kept"] > 0
    sft = results["sft"].metrics
    assert sft["steps"] == 12 and sft["eval_loss"] < sft["eval_loss_start"]

    # Again: every stage's output matches its config and inputs, so nothing runs.
    assert main(command) == 0
    assert capfd.readouterr().out.count("up to date, skipped") == 3


def test_the_container_is_non_root_and_writes_only_to_its_volumes(
    job_image, s3_env, s3_server, tmp_path, monkeypatch
):
    """The flags a stage runs with, with a probe in place of the stage's command."""
    the_plan = pipeline_file(tmp_path, s3_env, s3_server, job_image)
    manifests = render_stage(the_plan, the_plan.stages[0])
    container = pod_template(manifests)["spec"]["containers"][0]
    container["command"] = ["python", "-c", PROBE]
    folder = tmp_path / "mounts"
    folder.mkdir()
    folder.chmod(0o755)

    argv = container_command("podman", manifests, folder)
    probe = subprocess.run(argv, capture_output=True, text=True, timeout=300)

    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["uid=1000", "config=ok", "scratch=ok", "root=read-only"]


PROBE = """
import json, os
print(f"uid={os.getuid()}")
json.load(open(os.environ["KUBERLHF_CONFIG"]))
print("config=ok")
open("/scratch/probe", "w").write("x")
print("scratch=ok")
for path in ("/opt/kuberlhf/probe", "/tmp/probe", "/probe"):
    try:
        open(path, "w")
        print("root=writable:" + path)
        break
    except OSError:
        pass
else:
    print("root=read-only")
"""


def test_cancel_removes_the_runs_running_containers(job_image, s3_env, s3_server, tmp_path, capsys):
    the_plan = pipeline_file(tmp_path, s3_env, s3_server, job_image)
    manifests = render_stage(the_plan, the_plan.stages[0])
    # A stage's way with SIGTERM: checkpoint, then exit 75.
    pod_template(manifests)["spec"]["containers"][0]["command"] = ["python", "-c", STAGE_LIKE]
    folder = tmp_path / "mounts"
    folder.mkdir()
    command = container_command("podman", manifests, folder)
    running = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        listed = ["podman", "ps", "--quiet", "--filter", "label=kuberlhf.io/run=boxed"]
        # its SIGTERM handler in place (a signal before it would be ignored by PID 1 and the
        # stop would wait out its timeout)
        ready, _, _ = select.select([running.stdout], [], [], 120)
        assert ready and running.stdout.readline().strip() == "ready"

        assert (
            main(["cancel", the_plan.source, "--backend", "container", "--engine", "podman"]) == 0
        )

        assert "run boxed: deleted 1 containers" in capsys.readouterr().out
        assert running.wait(timeout=60) == 75  # stopped with SIGTERM, not killed
        assert not subprocess.run(listed, capture_output=True, text=True).stdout.strip()
    finally:
        running.kill()


STAGE_LIKE = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
print("ready", flush=True)
time.sleep(600)
"""
