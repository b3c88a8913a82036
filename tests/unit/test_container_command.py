"""The container backend's `run` command is the rendered Job, flag by flag."""

from __future__ import annotations

import json

import pytest
import yaml

from jobs.errors import BadInputError
from pipeline.backends.container import ContainerBackend, container_command, quantity
from pipeline.charts import pod_template, render_stage
from pipeline.config import plan

SECRET = "s3-credentials"


def stage_plan(tmp_path, values: dict | None = None, store: str = "s3://bucket/runs"):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "boxed",
                "store": store,
                "kubernetes": {
                    "values": {
                        "image": {"repository": "localhost/kuberlhf", "tag": "ci"},
                        "s3": {"existingSecret": SECRET, "endpoint": "http://127.0.0.1:9000"},
                        "shm": {"sizeLimit": "512Mi"},
                        **(values or {}),
                    }
                },
                "stages": {"bootstrap": {"config": {"daily_per_lang": 40, "hate_per_lang": 20}}},
            }
        )
    )
    the_plan = plan(str(path))
    return the_plan, render_stage(the_plan, the_plan.stages[0])


def test_the_command_is_the_rendered_pod(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-from-the-environment")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-environment")
    _, manifests = stage_plan(tmp_path)
    container = pod_template(manifests)["spec"]["containers"][0]
    folder = tmp_path / "mounts"
    folder.mkdir()

    argv = container_command("podman", manifests, folder)

    # The image, then the chart's command and arguments, as the kubelet would start them.
    image_at = argv.index(container["image"])
    assert argv[argv.index("--entrypoint") + 1] == container["command"][0]
    assert argv[image_at + 1 :] == container["command"][1:] + container.get("args", [])
    # Every literal variable with its value; Secret variables by name only.
    pairs = [argv[i + 1] for i, flag in enumerate(argv) if flag == "--env"]
    for variable in container["env"]:
        if "value" in variable:
            assert f"{variable['name']}={variable['value']}" in pairs
        else:
            assert variable["valueFrom"]["secretKeyRef"]["name"] == SECRET
            assert variable["name"] in pairs
    assert not any("from-the-environment" in part for part in argv)
    # Non-root, read-only root, no capabilities, as the pod's security contexts say.
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert "no-new-privileges" in argv
    # SIGKILL only after the pod's grace period (a checkpoint's time).
    assert argv[argv.index("--stop-timeout") + 1] == "600"
    # The ConfigMap as a read-only folder at the chart's path, the same config.
    [config_map] = [m for m in manifests if m["kind"] == "ConfigMap"]
    [config_mount] = [a for a in argv if a.endswith(":/etc/kuberlhf:ro")]
    written = json.loads((folder / "config" / "config.json").read_text())
    assert config_mount.startswith(str(folder / "config"))
    assert written == json.loads(config_map["data"]["config.json"])
    # emptyDirs: scratch as an anonymous volume, the memory one as the shm size.
    assert argv[argv.index("/scratch") - 1] == "--volume"
    assert argv[argv.index("--shm-size") + 1] == str(512 * 2**20)
    assert argv[argv.index("--pull") + 1] == "missing"
    assert argv[argv.index("--name") + 1] == "boxed-bootstrap"


def test_limits_and_gpus_become_engine_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    _, manifests = stage_plan(
        tmp_path, {"gpus": 1, "resources": {"limits": {"cpu": "1500m", "memory": "3Gi"}}}
    )
    (tmp_path / "docker").mkdir()
    (tmp_path / "podman").mkdir()
    docker = container_command("docker", manifests, tmp_path / "docker")
    podman = container_command("podman", manifests, tmp_path / "podman")
    assert docker[docker.index("--cpus") + 1] == "1.5"
    assert docker[docker.index("--memory") + 1] == str(3 * 2**30)
    assert docker[docker.index("--gpus") + 1] == "1"
    assert podman[podman.index("--device") + 1] == "nvidia.com/gpu=all"
    assert "--read-only-tmpfs=false" not in docker


def test_a_missing_secret_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    _, manifests = stage_plan(tmp_path)
    with pytest.raises(BadInputError, match="AWS_ACCESS_KEY_ID comes from the Secret 's3-cred"):
        container_command("podman", manifests, tmp_path)


def test_a_local_store_is_refused(tmp_path):
    the_plan, _ = stage_plan(tmp_path, store=str(tmp_path / "runs"))
    backend = ContainerBackend(engine="sh")  # any program on the PATH: nothing is run
    with pytest.raises(BadInputError, match=r"store: the container backend needs an s3://"):
        backend.run(the_plan)


@pytest.mark.parametrize(
    "text, value",
    [("512Mi", 512 * 2**20), ("2", 2), ("500m", 0.5), ("1G", 1e9), ("4Gi", 4 * 2**30)],
)
def test_kubernetes_quantities(text, value):
    assert quantity(text) == value


def test_a_missing_engine_is_a_clear_error(tmp_path, capsys):
    from pipeline.cli import main

    the_plan, _ = stage_plan(tmp_path)
    command = ["run", the_plan.source, "--backend", "container", "--engine", "no-such-engine"]
    assert main(command) == 65
    assert "needs no-such-engine, and it is not on the PATH" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("volume", "mount", "message"),
    [
        (
            {"name": "ca", "configMap": {"name": "corporate-ca"}},
            {},
            "'ca' is the cluster's ConfigMap 'corporate-ca'",
        ),
        (
            {"name": "models", "persistentVolumeClaim": {"claimName": "hf-cache"}},
            {},
            "'models' is a persistentVolumeClaim",
        ),
        (
            {"name": "cache", "emptyDir": {}},
            {"subPath": "hub"},
            "'cache' at /extra takes a subPath",
        ),
    ],
)
def test_a_chart_volume_the_container_backend_cannot_stand_in_for_is_named(
    tmp_path, monkeypatch, volume, mount, message
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    extra = {"name": volume["name"], "mountPath": "/extra", **mount}
    _, manifests = stage_plan(tmp_path, {"extraVolumes": [volume], "extraVolumeMounts": [extra]})
    (tmp_path / "mounts").mkdir()
    with pytest.raises(BadInputError, match=message):
        container_command("podman", manifests, tmp_path / "mounts")
    # an extra emptyDir is an anonymous volume, as the chart's scratch is
    plain = {
        "extraVolumes": [{"name": "cache", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "cache", "mountPath": "/extra"}],
    }
    _, manifests = stage_plan(tmp_path, plain)
    argv = container_command("podman", manifests, tmp_path / "mounts")
    assert [argv[i + 1] for i, flag in enumerate(argv) if flag == "--volume"].count("/extra") == 1
