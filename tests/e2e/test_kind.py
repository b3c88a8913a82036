"""The tiny pipeline on a real cluster: kind, the job image, MinIO, `rlhf run --backend
kubernetes`, and every stage's manifest checked in S3.

Runs where docker and kind are (a developer's laptop: `make e2e-kind`); skipped with the
reason everywhere else, as on the CI machines, which have neither.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, free_port

CLUSTER = "kuberlhf-e2e"
CONTEXT = f"kind-{CLUSTER}"
NAMESPACE = "kuberlhf-e2e"
IMAGE = "kuberlhf:cpu"


def docker_works() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


MISSING = [
    name
    for name, ok in (
        ("docker (with a running engine)", docker_works()),
        ("kind", bool(shutil.which("kind"))),
        ("kubectl", bool(shutil.which("kubectl"))),
    )
    if not ok
]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs a kind cluster; missing here: {', '.join(MISSING)}"
)


def sh(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def cluster():
    clusters = sh("kind", "get", "clusters", capture_output=True).stdout.split()
    if CLUSTER not in clusters:
        sh("kind", "create", "cluster", "--name", CLUSTER, "--wait", "120s")
    sh(
        "docker",
        "build",
        "-f",
        "images/Dockerfile",
        "--build-arg",
        "BASE_IMAGE=python:3.11-slim",
        "--build-arg",
        "TORCH_SPEC=torch==2.13.0",
        "--build-arg",
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
        "-t",
        IMAGE,
        ".",
        cwd=ROOT,
    )
    sh("kind", "load", "docker-image", IMAGE, "--name", CLUSTER)
    return CONTEXT


@pytest.fixture(scope="module")
def minio(cluster):
    """MinIO from charts/minio with fresh credentials in the Secret the stages read."""
    import helm_python
    from kubernetes import client, config, utils

    config.load_kube_config(context=cluster)
    api = client.ApiClient()
    core = client.CoreV1Api(api)
    subprocess.run(
        ["kubectl", "--context", cluster, "create", "namespace", NAMESPACE], capture_output=True
    )
    access, secret = f"e2e{secrets.token_hex(6)}", secrets.token_hex(16)
    subprocess.run(
        [
            "kubectl",
            "--context",
            cluster,
            "-n",
            NAMESPACE,
            "delete",
            "secret",
            "s3-credentials",
            "--ignore-not-found",
        ],
        check=True,
        capture_output=True,
    )
    core.create_namespaced_secret(
        NAMESPACE,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="s3-credentials"),
            string_data={"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret},
        ),
    )
    rendered = helm_python.Chart.load(str(ROOT / "charts" / "minio")).render(
        {"auth": {"existingSecret": "s3-credentials"}}, name="minio", namespace=NAMESPACE
    )
    for name, text in rendered.items():
        if not name.endswith("NOTES.txt"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    subprocess.run(
                        [
                            "kubectl",
                            "--context",
                            cluster,
                            "-n",
                            NAMESPACE,
                            "delete",
                            doc["kind"],
                            doc["metadata"]["name"],
                            "--ignore-not-found",
                        ],
                        capture_output=True,
                    )
                    utils.create_from_dict(api, doc, namespace=NAMESPACE)
    sh(
        "kubectl",
        "--context",
        cluster,
        "-n",
        NAMESPACE,
        "wait",
        "--for=condition=complete",
        "job/minio-buckets",
        "--timeout=300s",
    )
    port = free_port()
    forward = subprocess.Popen(
        [
            "kubectl",
            "--context",
            cluster,
            "-n",
            NAMESPACE,
            "port-forward",
            "svc/minio",
            f"{port}:9000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(3)
    yield {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "KUBERLHF_S3_ADDRESSING_STYLE": "path",
    }
    forward.terminate()


def test_tiny_pipeline_runs_on_kind_and_every_manifest_lands_in_s3(cluster, minio, monkeypatch):
    run_id = f"e2e-{secrets.token_hex(3)}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "examples/demo-k8s.yaml",
            "--backend",
            "kubernetes",
            "--context",
            cluster,
            "--run-id",
            run_id,
        ],
        cwd=ROOT,
        env={**os.environ, **minio},
        text=True,
        capture_output=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    from jobs import store
    from jobs.contract import require_finished

    for name, value in minio.items():
        monkeypatch.setenv(name, value)
    store.reset_clients()
    for stage in ("bootstrap", "data", "sft"):
        manifest = require_finished(f"s3://kuberlhf/runs/{run_id}/{stage}")
        assert manifest.image == IMAGE or manifest.image.endswith(IMAGE)
    assert require_finished(f"s3://kuberlhf/runs/{run_id}/sft").metrics["steps"] == 30
