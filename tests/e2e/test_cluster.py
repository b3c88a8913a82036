"""The pipeline on a real Kubernetes cluster through `rlhf run --backend kubernetes`: the happy
path, and what a real cluster showed going wrong (a bad input in a gang, a deleted pod,
`rlhf cancel`, a second `rlhf run`, a GPU stage on a cluster without GPUs, a namespace that
enforces Pod Security "restricted").

The cluster is either
- the one ``KUBECONFIG`` names, when ``KUBERLHF_E2E_IMAGE`` says which job image its nodes
  can run (``KUBERLHF_E2E_PULL_POLICY``, default IfNotPresent). S3: the endpoint pods use in
  ``KUBERLHF_E2E_S3_ENDPOINT`` with the usual AWS_* credentials and
  ``KUBERLHF_E2E_S3_LOCAL_ENDPOINT`` for this machine (default: the same), bucket
  ``KUBERLHF_E2E_BUCKET`` (default kuberlhf); without an endpoint, MinIO from charts/minio is
  installed in the test's namespace and reached through a port-forward; or
- a kind cluster the test makes (``make e2e-kind``: docker and kind on the machine).
Each module run gets namespaces of its own, deleted at the end. Elsewhere every test is
skipped with the reason, as on the CI machines, which have no cluster.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port

KIND_CLUSTER = "kuberlhf-e2e"
KIND_IMAGE = "kuberlhf:cpu"


def docker_works() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def cluster_mode() -> tuple[str | None, str]:
    """("kubeconfig" | "kind" | None, why not)."""
    if os.environ.get("KUBECONFIG") and os.environ.get("KUBERLHF_E2E_IMAGE"):
        return "kubeconfig", ""
    if os.environ.get("KUBERLHF_E2E_KIND"):
        missing = [
            name
            for name, ok in (
                ("docker (with a running engine)", docker_works()),
                ("kind", bool(shutil.which("kind"))),
                ("kubectl", bool(shutil.which("kubectl"))),
            )
            if not ok
        ]
        return ("kind", "") if not missing else (None, "missing here: " + ", ".join(missing))
    return None, "set KUBECONFIG and KUBERLHF_E2E_IMAGE, or run `make e2e-kind` (docker, kind)"


MODE, WHY = cluster_mode()
pytestmark = pytest.mark.skipif(MODE is None, reason=f"needs a Kubernetes cluster: {WHY}")


def sh(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, **kwargs)


class Cluster:
    """The cluster under test: how to reach it and what to run there."""

    def __init__(self, context: str | None, image: str, pull_policy: str) -> None:
        from kubernetes import client, config

        config.load_kube_config(context=context)
        self.context, self.image, self.pull_policy = context, image, pull_policy
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)

    def kubectl(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        context = ["--context", self.context] if self.context else []
        return subprocess.run(["kubectl", *context, *args], text=True, **kwargs)

    def namespace(self, restricted: bool = False) -> str:
        from kubernetes import client

        name = f"kuberlhf-e2e-{secrets.token_hex(3)}"
        labels = {"pod-security.kubernetes.io/enforce": "restricted"} if restricted else {}
        self.core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
        )
        return name

    def delete_namespace(self, name: str) -> None:
        self.core.delete_namespace(name)

    def jobs(self, namespace: str, run_id: str) -> list:
        return self.batch.list_namespaced_job(
            namespace, label_selector=f"kuberlhf.io/run={run_id}"
        ).items

    def pods(self, namespace: str, run_id: str) -> list:
        return self.core.list_namespaced_pod(
            namespace, label_selector=f"kuberlhf.io/run={run_id},kuberlhf.io/role=stage"
        ).items


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    if MODE == "kubeconfig":
        return Cluster(
            None,
            os.environ["KUBERLHF_E2E_IMAGE"],
            os.environ.get("KUBERLHF_E2E_PULL_POLICY", "IfNotPresent"),
        )
    clusters = sh("kind", "get", "clusters", capture_output=True).stdout.split()
    if KIND_CLUSTER not in clusters:
        sh("kind", "create", "cluster", "--name", KIND_CLUSTER, "--wait", "120s")
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
        KIND_IMAGE,
        ".",
        cwd=ROOT,
    )
    sh("kind", "load", "docker-image", KIND_IMAGE, "--name", KIND_CLUSTER)
    return Cluster(f"kind-{KIND_CLUSTER}", KIND_IMAGE, "Never")


def s3_secret(cluster: Cluster, namespace: str, access: str, secret: str) -> None:
    from kubernetes import client

    cluster.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="s3-credentials"),
            string_data={"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret},
        ),
    )


def install_minio(cluster: Cluster, namespace: str) -> tuple[dict, str]:
    """MinIO from charts/minio with fresh credentials: (this machine's S3 env, pods' URL)."""
    import helm_python
    from kubernetes import utils

    access, secret = f"e2e{secrets.token_hex(6)}", secrets.token_hex(16)
    s3_secret(cluster, namespace, access, secret)
    rendered = helm_python.Chart.load(str(ROOT / "charts" / "minio")).render(
        {"auth": {"existingSecret": "s3-credentials"}}, name="minio", namespace=namespace
    )
    for name, text in rendered.items():
        if not name.endswith("NOTES.txt"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    utils.create_from_dict(cluster.api, doc, namespace=namespace)
    cluster.kubectl(
        "-n",
        namespace,
        "wait",
        "--for=condition=complete",
        "job/minio-buckets",
        "--timeout=300s",
        check=True,
    )
    port = free_port()
    subprocess.Popen(
        [
            "kubectl",
            *(["--context", cluster.context] if cluster.context else []),
            "-n",
            namespace,
            "port-forward",
            "svc/minio",
            f"{port}:9000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(3)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "KUBERLHF_S3_ADDRESSING_STYLE": "path",
    }
    return env, f"http://minio.{namespace}:9000"


class Site:
    """A namespace of the cluster with S3 reachable from its pods and from here."""

    def __init__(self, cluster: Cluster, namespace: str, s3_env: dict, endpoint: str) -> None:
        self.cluster, self.namespace, self.s3_env, self.endpoint = (
            cluster,
            namespace,
            s3_env,
            endpoint,
        )
        self.bucket = os.environ.get("KUBERLHF_E2E_BUCKET", "kuberlhf")

    def pipeline(self, tmp_path: Path, stages: dict, **values) -> Path:
        """A pipeline file for this site; ``values`` add chart values for every stage."""
        doc = {
            "name": "e2e",
            "store": f"s3://{self.bucket}/runs",
            "kubernetes": {
                "namespace": self.namespace,
                "stall_timeout_s": values.pop("stall_timeout_s", 600),
                "values": {
                    "image": dict(
                        zip(("repository", "tag"), self.cluster.image.rsplit(":", 1), strict=True),
                        pullPolicy=self.cluster.pull_policy,
                    ),
                    "s3": {
                        "existingSecret": "s3-credentials",
                        "endpoint": self.endpoint,
                        "addressingStyle": "path",
                    },
                    "gpus": 0,
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                    "shm": {"sizeLimit": "512Mi"},
                    "scratch": {"sizeLimit": "4Gi"},
                    "activeDeadlineSeconds": 1800,
                    **values,
                },
            },
            "stages": stages,
        }
        path = tmp_path / f"pipeline-{secrets.token_hex(3)}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def rlhf(self, *args: str, background: bool = False, timeout: float = 3600):
        command = [sys.executable, "-m", "pipeline.cli", *args]
        if self.cluster.context and args[0] in ("run", "cancel"):
            command += ["--context", self.cluster.context]
        if args[0] == "run":
            command += ["--backend", "kubernetes"]
        env = {**os.environ, **self.s3_env}
        if background:
            return subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        return subprocess.run(
            command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout
        )

    def manifest(self, run_id: str, stage: str, monkeypatch):
        from jobs import store
        from jobs.contract import require_finished

        for name, value in self.s3_env.items():
            monkeypatch.setenv(name, value)
        store.reset_clients()
        return require_finished(f"s3://{self.bucket}/runs/{run_id}/{stage}")


def make_site(cluster: Cluster):
    namespace = cluster.namespace()
    if os.environ.get("KUBERLHF_E2E_S3_ENDPOINT"):
        endpoint = os.environ["KUBERLHF_E2E_S3_ENDPOINT"]
        s3_secret(
            cluster, namespace, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        )
        env = {
            "AWS_ENDPOINT_URL": os.environ.get("KUBERLHF_E2E_S3_LOCAL_ENDPOINT", endpoint),
            "KUBERLHF_S3_ADDRESSING_STYLE": "path",
        }
    else:
        env, endpoint = install_minio(cluster, namespace)
    return Site(cluster, namespace, env, endpoint)


@pytest.fixture(scope="module")
def site(cluster):
    made = make_site(cluster)
    yield made
    cluster.delete_namespace(made.namespace)


@pytest.fixture(scope="module")
def restricted_site(cluster, site):
    """A namespace enforcing Pod Security "restricted", using the other site's S3."""
    namespace = cluster.namespace(restricted=True)
    env = {**os.environ, **site.s3_env}
    s3_secret(cluster, namespace, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    yield Site(cluster, namespace, site.s3_env, site.endpoint)
    cluster.delete_namespace(namespace)


def demo_stages() -> dict:
    return yaml.safe_load((ROOT / "examples" / "demo-k8s.yaml").read_text())["stages"]


def wait_for(predicate, timeout: float = 600, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"not true within {timeout} s: {predicate.__doc__}")


def test_tiny_pipeline_runs_and_every_manifest_lands_in_s3(site, tmp_path, monkeypatch):
    run_id = f"e2e-{secrets.token_hex(3)}"
    result = site.rlhf("run", str(site.pipeline(tmp_path, demo_stages())), "--run-id", run_id)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for stage in ("bootstrap", "data", "sft"):
        manifest = site.manifest(run_id, stage, monkeypatch)
        assert manifest.image == site.cluster.image or manifest.image.endswith(site.cluster.image)
    assert site.manifest(run_id, "sft", monkeypatch).metrics["steps"] == 30


def test_bad_input_in_a_two_pod_gang_fails_one_job_without_retry(site, tmp_path):
    run_id = f"e2e-{secrets.token_hex(3)}"
    stages = {
        "sft": {
            "nnodes": 2,
            "retries": 2,
            "config": {"model": f"s3://{site.bucket}/no/such/model", "data": "s3://x/none"},
        }
    }
    result = site.rlhf("run", str(site.pipeline(tmp_path, stages)), "--run-id", run_id)
    assert result.returncode == 65, result.stdout[-4000:] + result.stderr[-4000:]
    assert "bad config or input (not retried)" in result.stderr
    assert "re-creating" not in result.stdout
    assert len(site.cluster.jobs(site.namespace, run_id)) == 1
    codes = [
        s.state.terminated.exit_code
        for pod in site.cluster.pods(site.namespace, run_id)
        for s in pod.status.container_statuses or []
        if s.state.terminated
    ]
    assert 65 in codes


def long_sft(tmp_path, site, run_id: str, steps: int = 400) -> tuple[Path, dict]:
    stages = demo_stages()
    stages["sft"]["config"].update(max_steps=steps, checkpoint_every=20, eval_every=10**6)
    return site.pipeline(tmp_path, stages), stages


def wait_running(site, run_id: str, stage: str = "sft"):
    def running():
        """a pod of the stage runs"""
        return [
            p
            for p in site.cluster.pods(site.namespace, run_id)
            if p.metadata.labels.get("kuberlhf.io/stage") == stage and p.status.phase == "Running"
        ]

    return wait_for(running, timeout=900)


def test_a_deleted_pod_checkpoints_and_the_stage_resumes(site, tmp_path, monkeypatch):
    run_id = f"e2e-{secrets.token_hex(3)}"
    path, _ = long_sft(tmp_path, site, run_id, steps=200)
    process = site.rlhf("run", str(path), "--run-id", run_id, background=True)
    [pod] = wait_running(site, run_id)
    time.sleep(60)  # past a checkpoint or two
    # the submitter put the stage's progress on its Job: `kubectl get jobs` shows it
    [job] = [
        j
        for j in site.cluster.jobs(site.namespace, run_id)
        if j.metadata.labels.get("kuberlhf.io/stage") == "sft"
    ]
    progress = (job.metadata.annotations or {}).get("kuberlhf.io/progress", "")
    assert re.match(r"step \d+/200 \(\d+%\), ", progress), progress
    site.cluster.core.delete_namespaced_pod(pod.metadata.name, site.namespace)
    out, err = process.communicate(timeout=3600)
    assert process.returncode == 0, out[-4000:] + err[-4000:]
    manifest = site.manifest(run_id, "sft", monkeypatch)
    assert manifest.metrics["steps"] == 200
    from jobs import store

    lines = store.read_text(f"s3://{site.bucket}/runs/{run_id}/sft/metrics.jsonl").splitlines()
    steps = [json.loads(x)["step"] for x in lines if "loss" in json.loads(x)]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's metrics


def test_cancel_ends_the_waiting_run_at_once(site, tmp_path):
    run_id = f"e2e-{secrets.token_hex(3)}"
    path, _ = long_sft(tmp_path, site, run_id, steps=5000)
    process = site.rlhf("run", str(path), "--run-id", run_id, background=True)
    wait_running(site, run_id)
    cancelled = site.rlhf("cancel", str(path), "--run-id", run_id)
    assert cancelled.returncode == 0, cancelled.stderr
    started = time.monotonic()
    out, err = process.communicate(timeout=180)
    assert time.monotonic() - started < 120
    assert process.returncode == 130, out[-3000:] + err[-3000:]
    assert "was deleted (rlhf cancel or kubectl delete); the run stops here" in err


def test_a_second_run_follows_the_running_job_instead_of_restarting_it(site, tmp_path):
    run_id = f"e2e-{secrets.token_hex(3)}"
    path, _ = long_sft(tmp_path, site, run_id, steps=300)
    first = site.rlhf("run", str(path), "--run-id", run_id, background=True)
    [pod] = wait_running(site, run_id)
    [job] = [j for j in site.cluster.jobs(site.namespace, run_id) if "sft" in j.metadata.name]
    second = site.rlhf("run", str(path), "--run-id", run_id, timeout=3600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "is running; following it" in second.stdout
    out, err = first.communicate(timeout=3600)
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    [after] = [j for j in site.cluster.jobs(site.namespace, run_id) if "sft" in j.metadata.name]
    assert after.metadata.uid == job.metadata.uid  # the same Job, never re-created
    names = {p.metadata.name for p in site.cluster.pods(site.namespace, run_id)}
    assert pod.metadata.name in names


def test_a_gpu_stage_is_created_and_the_schedulers_reason_is_reported(site, tmp_path, monkeypatch):
    from kubernetes import client

    nodes = client.CoreV1Api(site.cluster.api).list_node().items
    if any("nvidia.com/gpu" in (n.status.allocatable or {}) for n in nodes):
        pytest.skip("this cluster has GPUs: the stage would run, not wait")
    run_id = f"e2e-{secrets.token_hex(3)}"
    stages = {"bootstrap": {"config": {"daily_per_lang": 30, "hate_per_lang": 15}}}
    path = site.pipeline(tmp_path, stages, gpus=1, stall_timeout_s=90)
    result = site.rlhf("run", str(path), "--run-id", run_id, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    [job] = [
        j
        for j in site.cluster.jobs(site.namespace, run_id)
        if j.metadata.labels.get("kuberlhf.io/stage") == "bootstrap"
    ]  # created: the client took the GPU limit
    limits = job.spec.template.spec.containers[0].resources.limits
    assert limits["nvidia.com/gpu"] == "1"
    assert "FailedScheduling" in result.stdout and "nvidia.com/gpu" in result.stdout
    assert "no pod of the Job ran in" in result.stderr


def test_the_pipeline_runs_in_a_namespace_enforcing_pod_security_restricted(
    restricted_site, tmp_path, monkeypatch
):
    run_id = f"e2e-{secrets.token_hex(3)}"
    stages = {"bootstrap": {"config": {"daily_per_lang": 30, "hate_per_lang": 15}}}
    path = restricted_site.pipeline(tmp_path, stages)
    result = restricted_site.rlhf("run", str(path), "--run-id", run_id, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert restricted_site.manifest(run_id, "bootstrap", monkeypatch).stage == "bootstrap"
