"""The container backend: every stage as a container of the image its chart names, run
by the workstation's podman or docker — the images tried before they go to a cluster.

Nothing here decides what runs: the command, environment, user, root file system and
volumes are read off the Job the stage's chart renders, as the Kubernetes backend creates
it. What a cluster would supply, this machine stands in for: a ConfigMap becomes a
read-only folder, an emptyDir an anonymous volume (a tmpfs, or the shm size, for
``medium: Memory``), and a Secret's variables come from this environment by name, so
their values never appear on a command line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs import store
from jobs.contract import Manifest
from jobs.errors import BadInputError
from pipeline.backends import StageFailed, run_in_order, run_with_retries
from pipeline.charts import pod_template, render_stage
from pipeline.config import Plan, PlannedStage
from pipeline.launch import one_machine

ENGINES = ("podman", "docker")
# docker's and podman's own exit codes: the engine failed, or the command cannot run.
ENGINE_ERRORS = (125, 126, 127)
PULL = {"Never": "never", "IfNotPresent": "missing", "Always": "always"}
_QUANTITY = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|k|K|M|G|T|m)?$")
_FACTOR = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def find_engine(name: str | None = None) -> str:
    """The engine asked for (``--engine``, ``$KUBERLHF_CONTAINER_ENGINE``), else the first
    of podman and docker on the PATH."""
    wanted = name or os.environ.get("KUBERLHF_CONTAINER_ENGINE")
    for candidate in [wanted] if wanted else ENGINES:
        if shutil.which(candidate):
            return candidate
    raise BadInputError(
        f"the container backend needs {wanted or 'podman or docker'}, and it is not on the PATH"
    )


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("512Mi", "2", "500m") as a plain number."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise BadInputError(f"cannot read the Kubernetes quantity {value!r}")
    number, suffix = float(match.group(1)), match.group(2)
    return number / 1000 if suffix == "m" else number * _FACTOR[suffix]


def _user(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    if "runAsUser" not in context:
        return []
    group = f":{context['runAsGroup']}" if "runAsGroup" in context else ""
    return ["--user", f"{context['runAsUser']}{group}"]


def _hardening(engine: str, container: dict[str, Any]) -> list[str]:
    context = container.get("securityContext", {})
    args = []
    if context.get("readOnlyRootFilesystem"):
        # podman mounts tmpfs on /tmp, /run and /var/tmp under --read-only unless told not
        # to; a pod gets no such mounts, so neither does the container.
        args += ["--read-only"] + (["--read-only-tmpfs=false"] if engine == "podman" else [])
    for capability in context.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability]
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    return args


def _environment(stage: str, container: dict[str, Any]) -> list[str]:
    args = []
    for variable in container.get("env", []):
        name = variable["name"]
        if "value" in variable:
            args += ["--env", f"{name}={variable['value']}"]
            continue
        source = variable.get("valueFrom", {})
        if "secretKeyRef" not in source:
            raise BadInputError(
                f"stage {stage!r}: the container backend cannot supply {name} "
                f"(from {', '.join(source)}); it stands in for Secrets only"
            )
        if name not in os.environ:
            secret = source["secretKeyRef"]["name"]
            raise BadInputError(
                f"stage {stage!r}: {name} comes from the Secret {secret!r} on a cluster; "
                f"set {name} in this environment for the container backend"
            )
        args += ["--env", name]  # the value is taken from this environment by the engine
    return args


def _volumes(
    stage: str,
    manifests: list[dict[str, Any]],
    pod: dict[str, Any],
    mounts: list[dict],
    folder: Path,
) -> list[str]:
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    config_maps = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "ConfigMap"}
    args = []
    for mount in mounts:
        volume, path = volumes[mount["name"]], mount["mountPath"]
        if "subPath" in mount or "subPathExpr" in mount:
            raise BadInputError(
                f"stage {stage!r}: the mount of {mount['name']!r} at {path} takes a subPath, "
                "which the container backend does not stand in for"
            )
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            if name not in config_maps:
                raise BadInputError(
                    f"stage {stage!r}: volume {mount['name']!r} is the cluster's ConfigMap "
                    f"{name!r}, which the container backend cannot stand in for (it has the "
                    "chart's own ConfigMaps only)"
                )
            source = folder / mount["name"]
            if not source.exists():  # a volume mounted twice is written once
                source.mkdir(mode=0o755)
                for key, text in config_maps[name].get("data", {}).items():
                    (source / key).write_text(text)
                    (source / key).chmod(0o644)
            args += ["--volume", f"{source}:{path}:ro"]
        elif "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            size = volume["emptyDir"].get("sizeLimit")
            if path == "/dev/shm":
                args += ["--shm-size", str(int(quantity(size)))] if size else []
            else:
                args += ["--tmpfs", f"{path}:size={int(quantity(size))}" if size else path]
        elif "emptyDir" in volume:
            # An anonymous volume starts as a copy of the image's folder (its owner too,
            # the image's non-root user) and goes with the container, as an emptyDir.
            args += ["--volume", path]
        else:
            kind = next(key for key in volume if key != "name")
            raise BadInputError(
                f"stage {stage!r}: volume {mount['name']!r} is a {kind}, which the container "
                "backend cannot stand in for (it knows configMap and emptyDir)"
            )
    return args


def _resources(engine: str, container: dict[str, Any]) -> list[str]:
    limits = container.get("resources", {}).get("limits", {})
    args = []
    if "cpu" in limits:
        args += ["--cpus", f"{quantity(limits['cpu']):g}"]
    if "memory" in limits:
        args += ["--memory", str(int(quantity(limits["memory"])))]
    if int(limits.get("nvidia.com/gpu", 0)):
        count = int(limits["nvidia.com/gpu"])
        # docker's NVIDIA runtime takes a count; podman reaches GPUs through CDI.
        args += ["--gpus", str(count)] if engine == "docker" else ["--device", "nvidia.com/gpu=all"]
    return args


def container_command(
    engine: str, manifests: list[dict[str, Any]], folder: Path, network: str = "host"
) -> list[str]:
    """``<engine> run ...`` for the Job among the rendered manifests; ConfigMaps are
    written under ``folder``."""
    [job] = [m for m in manifests if m["kind"] == "Job"]
    template = pod_template(manifests)
    pod, [container] = template["spec"], template["spec"]["containers"]
    stage = job["metadata"]["name"]
    labels = template["metadata"].get("labels", {})
    argv = [engine, "run", "--rm", "--name", stage, f"--network={network}"]
    argv += ["--pull", PULL[container.get("imagePullPolicy", "IfNotPresent")]]
    for key in ("kuberlhf.io/run", "kuberlhf.io/stage"):
        argv += ["--label", f"{key}={labels[key]}"] if key in labels else []
    argv += _user(pod, container) + _hardening(engine, container)
    # SIGTERM, then SIGKILL after the pod's grace period: time to save a checkpoint.
    argv += ["--stop-timeout", str(pod.get("terminationGracePeriodSeconds", 30))]
    argv += _environment(stage, container)
    argv += _volumes(stage, manifests, pod, container.get("volumeMounts", []), folder)
    argv += _resources(engine, container)
    if "workingDir" in container:
        argv += ["--workdir", container["workingDir"]]
    command = list(container.get("command", []))
    if command:
        argv += ["--entrypoint", command[0]]
    argv += [container["image"], *command[1:], *container.get("args", [])]
    return argv


class ContainerBackend:
    def __init__(
        self,
        engine: str | None = None,
        network: str = "host",
        echo: Callable[[str], None] = print,
        runner=subprocess.run,
    ) -> None:
        self.engine, self.network = find_engine(engine), network
        self.echo, self.runner = echo, runner

    def run(self, plan: Plan, only: list[str] | None = None) -> dict[str, Manifest]:
        if not store.is_s3(plan.run_uri):
            raise BadInputError(
                f"{plan.source}: store: the container backend needs an s3:// store that the "
                f"containers reach, as pods do (kubernetes.values.s3.endpoint); "
                f"{plan.run_uri!r} is a folder of this machine"
            )
        return run_in_order(
            plan, only, self.echo, lambda stage, head: self.run_stage(plan, stage, head)
        )

    def run_stage(self, plan: Plan, stage: PlannedStage, head: str) -> None:
        one_machine(plan, stage)
        manifests = render_stage(plan, stage)
        with tempfile.TemporaryDirectory(prefix="kuberlhf-") as folder:
            Path(folder).chmod(0o755)
            argv = container_command(self.engine, manifests, Path(folder), self.network)
            name = argv[argv.index("--name") + 1]
            image = pod_template(manifests)["spec"]["containers"][0]["image"]
            self.echo(f"{head}: {self.engine} container {name} from {image}")

            def attempt() -> int:
                self._remove(["--filter", f"name=^{name}$"])  # a leftover of a killed run
                code = self.runner(argv, env=dict(os.environ)).returncode
                if code in ENGINE_ERRORS:
                    raise StageFailed(
                        stage.name,
                        code,
                        f"{self.engine} could not start the container "
                        "(its message is above); not retried",
                    )
                return code

            run_with_retries(plan, stage, head, self.echo, attempt)

    def delete(self, plan: Plan) -> int:
        """Stop the run's containers as a pod is stopped (SIGTERM: a training stage saves a
        checkpoint; SIGKILL after the pod's grace period, each container's stop timeout),
        then remove them."""
        return self._remove(["--filter", f"label=kuberlhf.io/run={plan.run_id}"], stop=True)

    def _remove(self, filters: list[str], stop: bool = False) -> int:
        listed = subprocess.run(
            [self.engine, "ps", "--all", "--quiet", *filters],
            capture_output=True,
            text=True,
            check=False,
        )
        ids = listed.stdout.split()
        if ids and stop:
            subprocess.run([self.engine, "stop", *ids], capture_output=True)
        if ids:
            subprocess.run([self.engine, "rm", "--force", *ids], capture_output=True, check=False)
        return len(ids)
