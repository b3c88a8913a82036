"""The stage charts, rendered by Helm's own engine and validated strictly against the
Kubernetes schema, plus the API server's semantic rules our Jobs rely on."""

from __future__ import annotations

import json
import re

import helm_python
import kubernetes_validate
import pytest
import yaml

from jobs.secrets import secret_name
from pipeline.chart_values import CHARTS, render_schema, stage_charts

helm_python.disable_logging()
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
DIGEST = "sha256:" + "0123456789abcdef" * 4
SCENARIOS = {
    "defaults": {},
    "gpu": {
        "gpus": 8,
        "resources": {"requests": {"cpu": "32", "memory": "256Gi"}, "limits": {"memory": "512Gi"}},
        "nprocPerNode": 8,
    },
    "multinode": {"run": "exp1", "nodes": 4, "nprocPerNode": 8, "gpus": 8, "masterPort": 23456},
    "scheduling": {
        "run": "exp1",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "topology.kubernetes.io/zone",
                                    "operator": "In",
                                    "values": ["a"],
                                }
                            ]
                        }
                    ]
                }
            }
        },
        "priorityClassName": "training-high",
        "schedulerName": "volcano",
        "image": {"repository": "registry.example.com/kuberlhf", "digest": DIGEST},
        "extraVolumes": [
            {
                "name": "models",
                "persistentVolumeClaim": {"claimName": "hf-cache", "readOnly": True},
            },
            {"name": "ca", "configMap": {"name": "corporate-ca"}},
        ],
        "extraVolumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "ca", "mountPath": "/etc/ssl/corporate", "readOnly": True},
        ],
        "serviceAccountName": "trainer",
        "imagePullSecrets": [{"name": "registry"}],
        "suspend": True,
        "kueue": {"queueName": "gpu-queue"},
        "activeDeadlineSeconds": 86400,
        "scratch": {"sizeLimit": "500Gi", "storageClassName": "local-nvme"},
        "s3": {
            "existingSecret": "s3-credentials",
            "endpoint": "http://minio.ml:9000",
            "addressingStyle": "path",
        },
        "env": [
            {"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        ],
        "podAnnotations": {"example.com/team": "alignment"},
        "networkPolicy": {
            "enabled": True,
            "s3": [{"ipBlock": {"cidr": "10.0.5.0/24"}}],
            "s3Ports": [9000],
            "extraEgress": [
                {"to": [{"ipBlock": {"cidr": "10.0.9.7/32"}}], "ports": [{"port": 443}]}
            ],
        },
    },
}
CONFIG = {"output": "s3://bucket/runs/exp1/stage", "seed": 0}


def render(chart, values: dict, namespace: str = "ml") -> list[dict]:
    rendered = helm_python.Chart.load(str(chart)).render(
        {"config": CONFIG, **values}, name="release", namespace=namespace
    )
    docs = []
    for name, text in rendered.items():
        if not name.endswith("NOTES.txt"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


CHART_IDS = [c.name for c in stage_charts()]


@pytest.mark.parametrize("chart", stage_charts(), ids=CHART_IDS)
def test_every_chart_passes_helm_lint(chart):
    result = helm_python.lint(str(chart), strict=True)
    assert result["errors"] == [], result
    assert all(m["severity"] <= 1 for m in result["messages"]), result  # info only


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("chart", stage_charts(), ids=CHART_IDS)
def test_rendered_manifests_validate_strictly(chart, scenario, version):
    for doc in render(chart, SCENARIOS[scenario]):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_catches_a_misspelt_field():
    [job] = by_kind(render(CHARTS / "sft", {}), "Job")
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("chart", stage_charts(), ids=CHART_IDS)
def test_jobs_keep_the_api_servers_semantic_rules(chart, scenario):
    """What a real server enforces on create and the offline schema does not know."""
    [job] = by_kind(render(chart, SCENARIOS[scenario]), "Job")
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    for rule in spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule and rule["onExitCodes"]["operator"] == "In":
            assert 0 not in rule["onExitCodes"]["values"]
    assert spec["completions"] == spec["parallelism"]
    if spec["completionMode"] == "Indexed":
        assert spec["completions"] >= 1
    containers = {c["name"] for c in spec["template"]["spec"]["containers"]}
    for rule in spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] in containers


def test_failure_policy_fails_at_once_on_bad_input_and_ignores_disruptions():
    [job] = by_kind(render(CHARTS / "sft", {}), "Job")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "stage", "operator": "In", "values": [65]},
    } in rules
    assert {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    } in rules
    assert job["spec"]["backoffLimit"] == 3


def test_multinode_is_an_indexed_gang_with_rendezvous_env():
    docs = render(CHARTS / "sft", SCENARIOS["multinode"])
    [job], [service] = by_kind(docs, "Job"), by_kind(docs, "Service")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimit"] == 0  # a lost rank fails the whole gang
    pod = spec["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert set(service["spec"]["selector"].items()) <= set(
        spec["template"]["metadata"]["labels"].items()
    )
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["PET_NNODES"]["value"] == "4" and env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert env["PET_MASTER_ADDR"]["value"] == (
        f"{job['metadata']['name']}-0.{service['metadata']['name']}.ml.svc"
    )
    assert env["PET_MASTER_PORT"]["value"] == "23456"
    assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert pod["containers"][0]["command"] == ["python", "-m", "jobs.launch", "sft"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


@pytest.mark.parametrize("run", ["7b-ko", "exp1"])
def test_a_gangs_service_is_a_dns_1035_label_whatever_the_run_id_starts_with(run):
    """Jobs and pods take names that start with a digit; a Service does not (the API server
    refused the rendezvous Service of run "7b-ko", which no offline schema catches)."""
    docs = render(CHARTS / "sft", {**SCENARIOS["multinode"], "run": run})
    [job], [service] = by_kind(docs, "Job"), by_kind(docs, "Service")
    name = service["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == name
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PET_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{name}.ml.svc"
    assert job["metadata"]["name"] == f"{run}-sft"


def test_labels_volumes_and_scheduling():
    docs = render(CHARTS / "sft", SCENARIOS["scheduling"])
    [job] = by_kind(docs, "Job")
    labels = job["metadata"]["labels"]
    assert labels["kuberlhf.io/run"] == "exp1" and labels["kuberlhf.io/stage"] == "sft"
    assert labels["app.kubernetes.io/name"] == "sft"
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 86400
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "training-high"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["scratch"]["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == (
        "local-nvme"
    )
    [config_map] = by_kind(docs, "ConfigMap")
    assert json.loads(config_map["data"]["config.json"]) == CONFIG
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {
        "config": "/etc/kuberlhf",
        "dshm": "/dev/shm",
        "scratch": "/scratch",
        "models": "/models",
        "ca": "/etc/ssl/corporate",
    }
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "hf-cache"
    assert pod["schedulerName"] == "volcano"
    # pinned by digest: the stage container and what it tells the stage it runs
    container = pod["containers"][0]
    assert container["image"] == f"registry.example.com/kuberlhf@{DIGEST}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBERLHF_IMAGE"] == container["image"]
    # helm test's pod gets the extras too: the stage's env may point into them (a CA bundle)
    [test_pod] = by_kind(docs, "Pod")
    tested = {m["name"]: m["mountPath"] for m in test_pod["spec"]["containers"][0]["volumeMounts"]}
    assert tested == {"scratch": "/scratch", "models": "/models", "ca": "/etc/ssl/corporate"}
    assert {v["name"] for v in test_pod["spec"]["volumes"]} == {"scratch", "models", "ca"}
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_helm_test_hook_verifies_the_output():
    [pod] = by_kind(render(CHARTS / "data", {}), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "jobs.verify",
        CONFIG["output"],
    ]


@pytest.mark.parametrize(
    "values",
    [
        {"s3": {"secretAccessKey": "abc123"}},
        {"s3": {"accessKeyId": "AKIA0000"}},
        {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc123"}]},
        {"env": [{"name": "OPENAI_API_KEY", "value": "sk-123"}]},
        {"env": [{"name": "MLFLOW_TRACKING_URI", "value": "https://alice:pw@mlflow.example"}]},
        {"env": [{"name": "WANDB_BASE_URL", "value": "https://wandb.example/?api_key=abcd"}]},
        {"gpu": 8},  # a typo
    ],
)
def test_schema_refuses_literal_secrets_and_unknown_keys(values):
    """Helm's schema check (helm install) and the submitter's model refuse alike."""
    from pydantic import ValidationError

    from pipeline.chart_values import StageValues

    with pytest.raises(helm_python.HelmValuesError):
        render(CHARTS / "sft", values)
    with pytest.raises(ValidationError):
        StageValues.model_validate({"stage": "sft", **values})
    plain = {"name": "MLFLOW_TRACKING_URI", "value": "https://mlflow.example:5000"}
    StageValues.model_validate({"stage": "sft", "env": [plain]})  # the control
    render(CHARTS / "sft", {"env": [plain]})


@pytest.mark.parametrize(
    "values",
    [
        {"shm": {"sizeLimit": "8GB"}},
        {"scratch": {"sizeLimit": "100 Gi"}},
        {"resources": {"requests": {"memory": "64 GiB"}}},
        {"resources": {"limit": {"cpu": "8"}}},  # a typo
        {"podLabels": {"kuberlhf.io/run": "other"}},  # the pods would leave their selector
        {"podLabels": {"app.kubernetes.io/instance": "x"}},
        {"podSecurityContext": {"runAsUser": 2**31}},  # the API server's ids are int32
        {"podSecurityContext": {"runAsUser": "1000"}},
    ],
)
def test_values_the_api_server_or_the_watch_would_trip_on_are_refused(values):
    """Quantities Kubernetes cannot parse (refused by the API server only after the
    ConfigMap and Service exist), and pod labels that would take the pods out of what the
    Service and the submitter select: refused by Helm's schema and the submitter's model."""
    from pydantic import ValidationError

    from pipeline.chart_values import StageValues

    with pytest.raises(helm_python.HelmValuesError):
        render(CHARTS / "sft", values)
    with pytest.raises(ValidationError):
        StageValues.model_validate({"stage": "sft", **values})


def test_resources_take_quantities_in_any_form_and_dra_claims():
    values = {
        "shm": {"sizeLimit": "16Gi"},
        "podLabels": {"team": "alignment"},
        "resources": {
            "requests": {"cpu": 8, "memory": "64Gi", "ephemeral-storage": "1.5e11"},
            "limits": {"cpu": "7500m"},
            "claims": [{"name": "gpu-claim"}],
        },
    }
    from pipeline.chart_values import StageValues

    StageValues.model_validate({"stage": "sft", **values})
    [job] = by_kind(render(CHARTS / "sft", values), "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["claims"] == [{"name": "gpu-claim"}]
    assert container["resources"]["requests"]["cpu"] == "8"
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "alignment"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)


def test_no_rendered_manifest_carries_a_credential():
    envs = []
    for chart in stage_charts():
        for doc in render(chart, SCENARIOS["scheduling"]):
            assert doc["kind"] != "Secret"
            pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Job" else doc.get("spec", {})
            for container in pod.get("containers", []):
                envs += container["env"]
    credentials = [e for e in envs if secret_name(e["name"])]
    assert {e["name"] for e in credentials} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
    }
    assert all("value" not in e and "valueFrom" in e for e in credentials)


def test_schema_files_are_generated_from_the_values_model():
    for chart in stage_charts():
        assert (chart / "values.schema.json").read_text() == render_schema(), (
            "run: python -m pipeline.chart_values"
        )


def test_every_stage_has_a_chart():
    from jobs.stages import STAGES

    assert sorted(c.name for c in stage_charts()) == sorted(STAGES)


def test_chart_defaults_match_the_values_model():
    from pipeline.chart_values import StageValues

    for chart in stage_charts():
        defaults = yaml.safe_load((chart / "values.yaml").read_text())
        assert StageValues.model_validate(defaults).stage == chart.name


def test_minio_chart_for_development_clusters():
    chart = CHARTS / "minio"
    assert helm_python.lint(str(chart), strict=True)["errors"] == []
    for values in ({}, {"persistence": {"enabled": True}, "buckets": ["a-bucket", "kuberlhf"]}):
        rendered = helm_python.Chart.load(str(chart)).render(values, name="minio", namespace="ml")
        docs = [
            d
            for name, text in rendered.items()
            if not name.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text)
            if d
        ]
        for doc in docs:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        text = json.dumps(docs)
        assert "secretKeyRef" in text and '"value": "minio' not in text
    with pytest.raises(helm_python.HelmValuesError):
        helm_python.Chart.load(str(chart)).render(
            {"auth": {"rootPassword": "x"}}, name="m", namespace="ml"
        )


@pytest.mark.parametrize("chart", stage_charts(), ids=lambda c: c.name)
def test_the_grace_period_leaves_time_for_a_checkpoint_and_is_a_value(chart):
    [job] = by_kind(render(chart, {}), "Job")
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600
    [job] = by_kind(render(chart, {"terminationGracePeriodSeconds": 1800}), "Job")
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 1800


def test_torchrun_gives_its_workers_the_grace_period_to_checkpoint():
    # torchrun SIGKILLs its workers 30 s after passing SIGTERM on, unless told otherwise
    from pipeline.charts import launch_of

    values = {**SCENARIOS["multinode"], "terminationGracePeriodSeconds": 1800}
    env = launch_of(render(CHARTS / "sft", values))["env"]
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "1770"
    env = launch_of(render(CHARTS / "sft", SCENARIOS["multinode"]))["env"]
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "570"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("chart", stage_charts(), ids=CHART_IDS)
def test_the_kubernetes_client_accepts_every_rendered_manifest(chart, scenario):
    """The client validates request bodies with its own models before sending, more
    strictly than the JSON schema (it refused an integer GPU limit)."""
    from pipeline.charts import client_model

    for doc in render(chart, SCENARIOS[scenario]):
        client_model(doc)


def test_quantities_given_as_numbers_reach_the_client_as_strings():
    from pipeline.charts import client_model

    values = {"gpus": 2, "nprocPerNode": 2, "resources": {"requests": {"cpu": 8, "memory": "64Gi"}}}
    [job] = by_kind(render(CHARTS / "sft", values), "Job")
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"nvidia.com/gpu": "2"},
    }
    client_model(job)
    resources["limits"]["nvidia.com/gpu"] = 2  # what the chart rendered before
    with pytest.raises(Exception, match="nvidia.com/gpu.*valid string"):
        client_model(job)

    # sizes in bytes are strings in the values (the schema's type) that YAML would read as
    # numbers, were they rendered bare
    for scratch in ({"sizeLimit": "1024"}, {"sizeLimit": "2048", "storageClassName": "fast"}):
        [job] = by_kind(
            render(CHARTS / "sft", {"shm": {"sizeLimit": "512"}, "scratch": scratch}), "Job"
        )
        client_model(job)
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "512"


RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict) -> list[str]:
    """What breaks Pod Security Standards' "restricted" profile (v1.29+ rules), as the
    admission controller checks it."""
    out, context = [], pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(key)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {kinds}")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        own, name = container.get("securityContext") or {}, container["name"]
        if own.get("privileged"):
            out.append(f"{name}: privileged")
        if own.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = own.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities")
        if not own.get("runAsNonRoot", context.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot")
        if own.get("runAsUser", context.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (own.get("seccompProfile") or context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        for port in container.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort")
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("chart", stage_charts(), ids=CHART_IDS)
def test_every_pod_meets_pod_security_restricted(chart, scenario):
    docs = render(chart, SCENARIOS[scenario])
    pods = [d["spec"]["template"]["spec"] for d in by_kind(docs, "Job")]
    pods += [d["spec"] for d in by_kind(docs, "Pod")]
    assert len(pods) == 2  # the stage's and the helm test's
    for pod in pods:
        assert restricted_violations(pod) == []
        assert pod["automountServiceAccountToken"] is False


def test_the_restricted_check_catches_what_the_namespace_refused():
    [job] = by_kind(render(CHARTS / "sft", {}), "Job")
    pod = job["spec"]["template"]["spec"]
    del pod["securityContext"]["seccompProfile"]
    assert restricted_violations(pod) == [
        "stage: seccompProfile must be RuntimeDefault or Localhost"
    ]


def test_the_platform_may_choose_the_pods_user_and_groups():
    """OpenShift's restricted SCC assigns a pod's user and fsGroup from the namespace's
    range and refuses a pod that names others: null leaves them out of both pods, which
    still meet the restricted profile and the strict schema."""
    from pipeline.chart_values import StageValues
    from pipeline.charts import client_model

    each = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}
    for unset in (each, {"podSecurityContext": None}):  # each, or the whole map
        StageValues.model_validate({"stage": "sft", **unset})
        docs = render(CHARTS / "sft", unset)
        pods = [j["spec"]["template"]["spec"] for j in by_kind(docs, "Job")]
        pods += [d["spec"] for d in by_kind(docs, "Pod")]
        assert len(pods) == 2
        for pod in pods:
            assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(pod["securityContext"])
            assert restricted_violations(pod) == []
        for doc in docs:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
            client_model(doc)
    [job] = by_kind(render(CHARTS / "sft", {}), "Job")  # by default, the image's user
    context = job["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (1000,) * 3
    # a namespace's range (OpenShift's start at 1000000000) and the root group, as given
    given = {"podSecurityContext": {"runAsUser": 1000680000, "runAsGroup": 0, "fsGroup": 0}}
    [job] = by_kind(render(CHARTS / "sft", given), "Job")
    context = job["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (1000680000, 0, 0)


def test_the_service_account_token_is_mounted_only_when_asked_for():
    [job] = by_kind(render(CHARTS / "sft", {"automountServiceAccountToken": True}), "Job")
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


def test_the_rendezvous_service_selects_the_stage_pods_and_not_the_test_pod():
    docs = render(CHARTS / "sft", SCENARIOS["multinode"])
    [service], [job], [test] = by_kind(docs, "Service"), by_kind(docs, "Job"), by_kind(docs, "Pod")
    selector = set(service["spec"]["selector"].items())
    assert selector <= set(job["spec"]["template"]["metadata"]["labels"].items())
    assert not selector <= set(test["metadata"]["labels"].items())


def test_the_job_carries_the_hash_of_its_config():
    [first] = by_kind(render(CHARTS / "sft", {}), "Job")
    [same] = by_kind(render(CHARTS / "sft", {"gpus": 2, "nprocPerNode": 2}), "Job")
    [changed] = by_kind(render(CHARTS / "sft", {"config": {**CONFIG, "seed": 1}}), "Job")
    key = "kuberlhf.io/config-sha256"
    assert first["metadata"]["annotations"][key] == same["metadata"]["annotations"][key]
    assert first["metadata"]["annotations"][key] != changed["metadata"]["annotations"][key]


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_a_gangs_pods_are_reachable_from_its_own_pods_only():
    docs = render(CHARTS / "sft", SCENARIOS["multinode"])
    [policy] = by_kind(docs, "NetworkPolicy")
    gang = by_kind(docs, "Job")[0]["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert selects(spec["podSelector"], gang)
    [rule] = spec["ingress"]  # one rule: from the gang, nothing else
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"} and selects(peer["podSelector"], gang)
    # another run's pod of the same stage, and this run's other stage, are not let in
    assert not selects(peer["podSelector"], {**gang, "kuberlhf.io/run": "someone-else"})
    assert not selects(peer["podSelector"], {**gang, "kuberlhf.io/stage": "dpo"})
    test_pods = [d for d in render(CHARTS / "sft", SCENARIOS["multinode"]) if d["kind"] == "Pod"]
    assert all(not selects(peer["podSelector"], p["metadata"]["labels"]) for p in test_pods)
    assert spec["policyTypes"] == ["Ingress"]  # egress open until the user names S3


def test_the_network_policy_is_on_for_gangs_and_where_asked():
    def policies(values):
        return by_kind(render(CHARTS / "sft", values), "NetworkPolicy")

    assert policies({}) == []  # one pod: nothing to rendezvous with
    assert len(policies({"networkPolicy": {"enabled": True}})) == 1
    assert policies({**SCENARIOS["multinode"], "networkPolicy": {"enabled": False}}) == []


def test_naming_s3_limits_egress_to_s3_dns_and_the_gang():
    [policy] = by_kind(render(CHARTS / "sft", SCENARIOS["scheduling"]), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    to_gang, to_s3, to_dns, extra = spec["egress"]
    assert selects(to_gang["to"][0]["podSelector"], {**spec["podSelector"]["matchLabels"]})
    assert to_s3 == {
        "to": [{"ipBlock": {"cidr": "10.0.5.0/24"}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    }
    assert to_dns["to"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}
    ]
    assert {p["port"] for p in to_dns["ports"]} == {53}
    assert extra["to"] == [{"ipBlock": {"cidr": "10.0.9.7/32"}}]


CACHE = {"name": "cache", "emptyDir": {}}


@pytest.mark.parametrize(
    ("bad", "good", "where"),
    [
        ({"image": {"digest": "sha256:abc"}}, {"image": {"digest": DIGEST}}, "/image/digest"),
        (
            {"image": {"digest": DIGEST.removeprefix("sha256:")}},
            {"image": {"digest": "sha512:" + "ab" * 64}},
            "/image/digest",
        ),
        ({"schedulerName": "Volcano_Batch"}, {"schedulerName": "volcano"}, "/schedulerName"),
        (
            {"extraVolumes": [{"name": "scratch", "emptyDir": {}}]},  # the chart's own
            {"extraVolumes": [CACHE]},
            "/extraVolumes/0/name",
        ),
        ({"extraVolumes": [{"emptyDir": {}}]}, {"extraVolumes": [CACHE]}, "/extraVolumes/0"),
        (
            {"extraVolumes": [CACHE, CACHE]},
            {"extraVolumes": [CACHE, {**CACHE, "name": "cache2"}]},
            "extraVolumes: cache is given twice",
        ),
        (  # the chart's path, however written
            {
                "extraVolumes": [CACHE],
                "extraVolumeMounts": [{"name": "cache", "mountPath": "/scratch/"}],
            },
            {
                "extraVolumes": [CACHE],
                "extraVolumeMounts": [{"name": "cache", "mountPath": "/cache/"}],
            },
            "/extraVolumeMounts/0/mountPath",
        ),
        (
            {"extraVolumes": [CACHE], "extraVolumeMounts": [{"name": "cache"}]},
            {"extraVolumes": [CACHE], "extraVolumeMounts": [{"name": "cache", "mountPath": "/c"}]},
            "/extraVolumeMounts/0",
        ),
        (
            {
                "extraVolumes": [CACHE, {**CACHE, "name": "other"}],
                "extraVolumeMounts": [
                    {"name": "cache", "mountPath": "/c"},
                    {"name": "other", "mountPath": "/c/"},
                ],
            },
            {
                "extraVolumes": [CACHE, {**CACHE, "name": "other"}],
                "extraVolumeMounts": [
                    {"name": "cache", "mountPath": "/c"},
                    {"name": "other", "mountPath": "/d"},
                ],
            },
            "extraVolumeMounts: /c/ is mounted twice",
        ),
    ],
)
def test_platform_values_are_checked_where_they_are_given(bad, good, where):
    """Each refused by Helm (its schema, or the template where a schema cannot say it) and
    by the submitter's model, and the value next to it accepted by both."""
    from pydantic import ValidationError

    from pipeline.chart_values import StageValues

    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as refused:
        render(CHARTS / "sft", bad)
    assert where in str(refused.value)
    with pytest.raises(ValidationError):
        StageValues.model_validate({"stage": "sft", **bad})
    assert by_kind(render(CHARTS / "sft", good), "Job")
    StageValues.model_validate({"stage": "sft", **good})


def test_a_mount_of_a_volume_the_pod_lacks_is_refused_before_anything_is_created():
    """The API server refuses such a pod only once the Job exists; Helm's template and the
    submitter's model say so first, naming the volume."""
    from pydantic import ValidationError

    from pipeline.chart_values import StageValues

    values = {"extraVolumeMounts": [{"name": "models", "mountPath": "/models"}]}
    with pytest.raises(helm_python.HelmRenderError, match="models is no volume of extraVolumes"):
        render(CHARTS / "sft", values)
    with pytest.raises(ValidationError, match="'models' is no volume of extraVolumes"):
        StageValues.model_validate({"stage": "sft", **values})
    given = {**values, "extraVolumes": [{"name": "models", "emptyDir": {}}]}
    [job] = by_kind(render(CHARTS / "sft", given), "Job")
    StageValues.model_validate({"stage": "sft", **given})
    assert job["spec"]["template"]["spec"]["volumes"][-1] == {"name": "models", "emptyDir": {}}
