"""The values every stage chart takes, as one pydantic model: the source of each chart's
``values.schema.json`` (closed, so a typo fails at ``helm install``) and what the
submitter validates before it renders.

Regenerate the schema files after changing this module:
``python -m pipeline.chart_values`` (a test fails while they are stale).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from jobs.secrets import (
    PLAIN,
    SECRET_NAME,
    URL_HTTP,
    URL_WITH_KEY,
    URL_WITH_USER,
    check_url,
    key_env_names,
    secret_name,
)

CHARTS = Path(__file__).resolve().parents[1] / "charts"
LIBRARY = "kuberlhf-job"
# A Kubernetes quantity (apimachinery's resource.Quantity): "64Gi", "1500m", "8"; "8GB" and
# "100 Gi" pass every offline check and are refused by the API server after the ConfigMap
# and Service exist.
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY)]
# The labels the Job's pods are selected by (the rendezvous Service, the submitter's watch).
SELECTOR_LABELS = r"^(kuberlhf\.io/.*|app\.kubernetes\.io/(name|instance))$"
# The stage pod's own volumes and where they are mounted: extra ones may not take them.
CHART_VOLUMES = {"config": "/etc/kuberlhf", "dshm": "/dev/shm", "scratch": "/scratch"}
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
CHART_PATHS = "^(" + "|".join(CHART_VOLUMES.values()) + ")/*$"
# empty, or a DNS subdomain (a scheduler's name)
SUBDOMAIN_OR_EMPTY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"


def objects(required: list[str], **properties: dict) -> dict:
    """The schema of a list of Kubernetes objects (volumes, mounts): each with ``required``
    keys and ``properties`` checked, the rest as the API server takes it."""
    return {"items": {"type": "object", "required": required, "properties": properties}}


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Image(Closed):
    repository: str = "kuberlhf"
    tag: str = Field("", description="default: the chart's appVersion")
    digest: str = Field(
        "",
        pattern=r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})?$",
        description="pins the image by content: repository@digest (the tag is then unused)",
    )
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class S3(Closed):
    existingSecret: str = Field(
        "",
        description="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; never keys here",
    )
    endpoint: str = Field(
        "",
        description="S3-compatible endpoint URL; empty for AWS (no credentials in it)",
        json_schema_extra={
            "pattern": URL_HTTP,
            "not": {"anyOf": [{"pattern": URL_WITH_USER}, {"pattern": URL_WITH_KEY}]},
        },
    )
    region: str = "us-east-1"
    addressingStyle: Literal["auto", "path", "virtual"] = "auto"

    @field_validator("endpoint")
    @classmethod
    def _no_credentials_in_url(cls, url: str) -> str:
        return url and check_url(url)


class Kueue(Closed):
    queueName: str = Field("", description="kueue.x-k8s.io/queue-name; with suspend: true")


class Shm(Closed):
    sizeLimit: Quantity = "8Gi"


class PodSecurity(Closed):
    """The pods' user and groups; null leaves one to the platform (OpenShift's restricted
    SCC assigns a user and fsGroup from the namespace's range, and refuses a pod that names
    one outside it). The image runs as any user: what it writes is on /scratch."""

    # an int32, as the API server takes one; strict: Helm's schema refuses "1000" too
    runAsUser: StrictInt | None = Field(1000, ge=1, le=2**31 - 1)
    runAsGroup: StrictInt | None = Field(1000, ge=0, le=2**31 - 1)
    fsGroup: StrictInt | None = Field(1000, ge=0, le=2**31 - 1)


class Scratch(Closed):
    sizeLimit: Quantity = "100Gi"
    storageClassName: str = Field(
        "", description="set to use a generic ephemeral volume of this class instead of emptyDir"
    )


class NetworkPolicy(Closed):
    enabled: bool | None = Field(
        None, description="a NetworkPolicy for the stage's pods; default: on for nodes > 1"
    )
    s3: list[dict[str, Any]] = Field(
        default_factory=list,
        description="NetworkPolicyPeers of the S3 endpoint (ipBlock, namespaceSelector...); "
        "when given, egress is limited to them, DNS and the gang's own pods",
    )
    s3Ports: list[int] = Field(default_factory=lambda: [443], description="the S3 endpoint's ports")
    dnsNamespace: str = Field("kube-system", description="where the cluster DNS runs")
    extraEgress: list[dict[str, Any]] = Field(
        default_factory=list, description="more NetworkPolicyEgressRules (a judge endpoint)"
    )


class Resources(Closed):
    """The stage container's resources (the GPU limit comes from ``gpus``)."""

    limits: dict[str, Quantity | int | float] = {}
    requests: dict[str, Quantity | int | float] = {}
    claims: list[dict[str, Any]] = Field(default_factory=list, description="DRA claims")


class Tests(Closed):
    enabled: bool = True


class StageValues(Closed):
    stage: str = Field(description="fixed by each stage's chart")
    run: str = Field(
        "",
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
        max_length=40,
        description="run id: the kuberlhf.io/run label and part of the Job name",
    )
    name: str = Field(
        "",
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
        max_length=40,
        description="the stage's name in its pipeline (default: stage): the kuberlhf.io/stage "
        "label and the Job name's suffix, so two stages of one kind get two Jobs",
    )
    output: str = Field("", description="the stage output URI, for NOTES and the helm test")
    config: dict[str, Any] = Field(default_factory=dict, description="the stage config")
    image: Image = Image()
    imagePullSecrets: list[dict[str, str]] = []
    serviceAccountName: str = ""
    nodes: int = Field(1, ge=1, description="pods of an Indexed Job (multi-node training)")
    nprocPerNode: int = Field(1, ge=1, description="processes per pod (torchrun when > 1)")
    masterPort: int = Field(29500, ge=1, le=65535)
    gpus: int = Field(0, ge=0, description="GPUs per pod")
    gpuResource: str = "nvidia.com/gpu"
    resources: Resources = Resources()
    nodeSelector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    affinity: dict[str, Any] = {}
    priorityClassName: str = ""
    schedulerName: str = Field(
        "",
        pattern=SUBDOMAIN_OR_EMPTY,
        max_length=253,
        description="a batch scheduler for the pods (Volcano, scheduler-plugins' "
        "coscheduling); default: the cluster's",
    )
    extraVolumes: list[dict[str, Any]] = Field(
        default_factory=list,
        description="more volumes of the stage pod (a model cache PVC, a CA bundle)",
        json_schema_extra=objects(
            ["name"],
            name={
                "type": "string",
                "pattern": DNS_LABEL,
                "maxLength": 63,
                "not": {"enum": list(CHART_VOLUMES)},
            },
        ),
    )
    extraVolumeMounts: list[dict[str, Any]] = Field(
        default_factory=list,
        description="mounts of extraVolumes in the stage container (and the helm test's)",
        json_schema_extra=objects(
            ["name", "mountPath"],
            name={"type": "string"},
            mountPath={"type": "string", "not": {"pattern": CHART_PATHS}},
        ),
    )
    podAnnotations: dict[str, str] = {}
    podLabels: dict[str, str] = Field(
        default_factory=dict,
        description="more pod labels (not the ones the pods are selected by)",
        json_schema_extra={"propertyNames": {"not": {"pattern": SELECTOR_LABELS}}},
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="extra container env; a credential must use valueFrom, never value",
        json_schema_extra={
            "items": {
                "type": "object",
                # a literal value never carries a URL's credential (a tracking server's
                # https://user:password@host, or ?api_key=)
                "properties": {
                    "value": {
                        "not": {"anyOf": [{"pattern": URL_WITH_USER}, {"pattern": URL_WITH_KEY}]}
                    }
                },
                # a name with a credential's word and a literal value (the chart's template
                # refuses the names the config's *_env fields give, whatever they are)
                "if": {
                    "properties": {"name": {"pattern": SECRET_NAME, "not": {"enum": list(PLAIN)}}},
                    "required": ["name"],
                },
                "then": {
                    "required": ["valueFrom"],
                    "properties": {"valueFrom": {"required": ["secretKeyRef"]}},
                },
            }
        },
    )
    s3: S3 = S3()
    backoffLimit: int = Field(3, ge=0, description="retries of a single-pod stage")
    activeDeadlineSeconds: int | None = Field(None, ge=1)
    automountServiceAccountToken: bool = Field(
        False, description="mount the service account's API token (the stages need none)"
    )
    terminationGracePeriodSeconds: int = Field(
        600, ge=0, description="SIGTERM to SIGKILL: time to finish a step and save a checkpoint"
    )
    ttlSecondsAfterFinished: int | None = Field(604800, ge=0)
    suspend: bool = False
    kueue: Kueue = Kueue()
    shm: Shm = Shm()
    scratch: Scratch = Scratch()
    readOnlyRootFilesystem: bool = True
    podSecurityContext: PodSecurity | None = PodSecurity()  # null: all three the platform's
    networkPolicy: NetworkPolicy = NetworkPolicy()
    tests: Tests = Tests()

    @field_validator("podLabels")
    @classmethod
    def _not_the_selector(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if re.match(SELECTOR_LABELS, key):
                raise ValueError(
                    f"podLabels: {key} is one of the labels the stage's pods are selected by "
                    "(the rendezvous Service, the submitter's watch); it is set by the chart"
                )
        return labels

    @model_validator(mode="after")
    def _volumes_of_their_own(self) -> StageValues:
        names = [volume.get("name") for volume in self.extraVolumes]
        for name in names:
            if not isinstance(name, str) or not re.match(DNS_LABEL, name) or len(name) > 63:
                raise ValueError(f"extraVolumes: {name!r} is not a volume name (a DNS label)")
            if name in CHART_VOLUMES or names.count(name) > 1:
                why = "the chart's own" if name in CHART_VOLUMES else "given twice"
                raise ValueError(f"extraVolumes: {name!r} is {why}; give it another name")
        paths: list[str] = []
        for mount in self.extraVolumeMounts:
            name, path = mount.get("name"), mount.get("mountPath")
            if name not in names:
                raise ValueError(
                    f"extraVolumeMounts: {name!r} is no volume of extraVolumes; add it there"
                )
            if not isinstance(path, str) or re.match(CHART_PATHS, path):
                raise ValueError(
                    f"extraVolumeMounts: {path!r} is not a path of its own (the chart mounts "
                    f"{', '.join(CHART_VOLUMES.values())})"
                )
            if path.rstrip("/") in paths:
                raise ValueError(f"extraVolumeMounts: {path!r} is mounted twice")
            paths.append(path.rstrip("/"))
        return self

    @model_validator(mode="after")
    def _no_literal_credentials(self) -> StageValues:
        keys = key_env_names(self.config)
        for entry in self.env:
            name = entry.get("name", "")
            from_secret = "secretKeyRef" in (entry.get("valueFrom") or {})
            if not from_secret and (secret_name(name) or name in keys):
                why = "the stage config names it as a key" if name in keys else "a credential"
                raise ValueError(
                    f"env {name}: {why}; give it with valueFrom.secretKeyRef (a Secret)"
                )
            value = entry.get("value")
            if isinstance(value, str) and (
                re.search(URL_WITH_USER, value) or re.search(URL_WITH_KEY, value)
            ):
                raise ValueError(
                    f"env {name}: the URL carries a credential (user:password@ or a key "
                    "parameter); give the credential in its own variable from a Secret"
                )
        return self


def schema() -> dict:
    """The JSON schema of a stage chart's values: closed at every level."""
    out = StageValues.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft-07/schema#"
    # Helm adds an empty map per dependency (the library chart) and `global`.
    out["properties"][LIBRARY] = {"type": "object"}
    out["properties"]["global"] = {"type": "object"}
    _tidy(out)
    return out


def _tidy(node: Any) -> None:
    """Drop pydantic's titles, and let optional integers be null the way draft-07 says it."""
    if isinstance(node, dict):
        node.pop("title", None)
        if "anyOf" in node and {"type": "null"} in node["anyOf"]:
            types = [n["type"] for n in node["anyOf"] if "type" in n]
            if len(types) == len(node["anyOf"]):
                extra = {k: v for n in node.pop("anyOf") for k, v in n.items() if k != "type"}
                node.update(extra, type=types)
        for value in node.values():
            _tidy(value)
    elif isinstance(node, list):
        for value in node:
            _tidy(value)


def stage_charts() -> list[Path]:
    return sorted(
        p.parent for p in CHARTS.glob("*/Chart.yaml") if p.parent.name not in {LIBRARY, "minio"}
    )


def render_schema() -> str:
    return json.dumps(schema(), indent=2) + "\n"


def main() -> None:
    text = render_schema()
    for chart in stage_charts():
        (chart / "values.schema.json").write_text(text)
        print(f"wrote {chart / 'values.schema.json'}")


if __name__ == "__main__":
    main()
