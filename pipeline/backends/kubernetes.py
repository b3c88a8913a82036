"""The kubernetes backend: each stage as the Job its chart renders, watched to the end.

Nothing here builds a Job: the manifests come from the stage charts (pipeline/charts.py)
and are created as they are. Jobs and Pods are followed with the watch API
(re-listing when the resource version expires); progress, outcomes and failure reports
come from pipeline/watch.py. A failed training gang is re-created whole, and resumes from
its newest checkpoint; stages whose manifests are complete in the store are skipped.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from jobs import store
from jobs.contract import Manifest, up_to_date
from jobs.errors import EXIT_BAD_INPUT, BadInputError, TransientError
from pipeline.backends import StageFailed, check_not_cancelled, run_in_order
from pipeline.charts import client_model, render_stage
from pipeline.config import Plan, PlannedStage
from pipeline.status import CANCELLED, mark_given_up, read_progress, summary
from pipeline.watch import (
    BAD_INPUT,
    Outcome,
    StageTracker,
    event_lines,
    explain,
    identity,
    own_events,
    relisted,
    stalled,
    under_way,
    warnings_to_show,
)


def run_selector(run_id: str, stage: str | None = None, pods: bool = False) -> str:
    """The label selector of a run's (or a stage's) Jobs, or of the pods that run stages
    (not the `helm test` pod)."""
    selector = f"kuberlhf.io/run={run_id}"
    selector = f"{selector},kuberlhf.io/stage={stage}" if stage else selector
    return f"{selector},kuberlhf.io/role=stage" if pods else selector


def job_finished(job: dict[str, Any]) -> bool:
    """Complete, failed or failing (FailureTarget: its pods are being stopped), or being
    deleted: nothing a re-run should follow."""
    conditions = job.get("status", {}).get("conditions") or []
    done = {c.get("type") for c in conditions if c.get("status") == "True"}
    ended = {"Complete", "Failed", "FailureTarget"}
    return bool(done & ended) or bool(job["metadata"].get("deletionTimestamp"))


def same_config(existing: dict[str, Any], rendered: dict[str, Any]) -> bool:
    """Whether a Job in the cluster runs what the chart renders now: the stage config (its
    hash) on the same image, GPUs and nodes (a re-run that changes any of them replaces the
    Job rather than following it)."""
    key = "kuberlhf.io/config-sha256"
    ours = (rendered["metadata"].get("annotations") or {}).get(key)
    theirs = (existing["metadata"].get("annotations") or {}).get(key)
    return ours is not None and theirs == ours and job_shape(existing) == job_shape(rendered)


def job_shape(job: dict[str, Any]) -> tuple:
    """What of a Job's spec a re-run may change besides the config: pods per gang, and each
    container's image and GPU count (fields the API server keeps as given; the rest it
    fills with defaults, so a whole-spec comparison would never match; of the limits, the
    extended resources such as GPUs, which the server keeps as written)."""
    spec = job.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    containers = []
    for container in pod.get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        # the accelerator's resource is the chart's gpuResource: every limit, as strings
        accelerators = sorted((k, str(v)) for k, v in limits.items() if "/" in k)
        containers.append((container.get("name"), container.get("image"), accelerators))
    return spec.get("completions"), spec.get("parallelism"), containers


class KubernetesBackend:
    def __init__(
        self, context: str | None = None, echo: Callable[[str], None] = print, poll_s: float = 10.0
    ) -> None:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
            else:
                config.load_kube_config(context=context)
        except ConfigException as exc:
            where = f"context {context!r}" if context else "the current context"
            raise BadInputError(
                f"kubernetes: cannot use {where} of the kubeconfig "
                f"({os.environ.get('KUBECONFIG') or '~/.kube/config'}): {exc}"
            ) from None
        self.api = client.ApiClient()
        self.batch = Timed(client.BatchV1Api(self.api))
        self.core = Timed(client.CoreV1Api(self.api))
        self.networking = Timed(client.NetworkingV1Api(self.api))
        self.echo, self.poll_s = echo, poll_s
        self.annotate_warned = False

    # --- the client interface -------------------------------------------------------

    def run(self, plan: Plan, only: list[str] | None = None) -> dict[str, Manifest]:
        """Submit every stage in order and wait for each (a stage needs its inputs done)."""
        with api_errors(plan.kubernetes.namespace):
            return run_in_order(
                plan, only, self.echo, lambda stage, head: self.run_stage(plan, stage, head)
            )

    def run_stage(self, plan: Plan, stage: PlannedStage, head: str) -> None:
        manifests = render_stage(plan, stage)
        [job] = [m for m in manifests if m["kind"] == "Job"]
        if why := gpus_and_processes(job):
            raise BadInputError(f"{plan.source}: stages.{stage.name}: {why}")
        name, namespace = job["metadata"]["name"], plan.kubernetes.namespace
        counted = spared = 0  # failures counted against `retries`; those a disruption caused
        while True:
            # On every attempt: a second `rlhf run` of the run, following the same Job, may
            # have made the new one first (replacing that would kill a healthy gang).
            running = self.running_job(namespace, name)
            if running is not None and same_config(running, job):
                # `rlhf run` again while the stage runs: follow it, do not restart it.
                self.echo(f"{head}: Job {name} is running; following it")
            else:
                self.submit(plan, manifests)
                self.echo(f"{head}: Job {name} in namespace {namespace}")
            tracker, outcome = self.wait(plan, stage, name, head)
            # A Job that went (its TTL) while no watch was open, or before the first list
            # (then nothing was seen of it, and the wait ended as a stall).
            vanished = outcome.reason == "Deleted" or (
                outcome.reason == "NoProgress" and not tracker.job
            )
            if outcome.succeeded or (vanished and finished_unseen(plan, stage)):
                self._clear_helpers(namespace, manifests)
                return
            report = explain(tracker, outcome, self.events(plan, tracker), self.logs(plan, stage))
            if outcome.exit_code == EXIT_BAD_INPUT:
                report = f"{BAD_INPUT}\n{report}"
            if outcome.reason in ("NoProgress", "Evicted"):  # it could go on unattended
                self._delete_job(namespace, name)
                report += f"\nthe Job {name} was deleted: it would otherwise go on unattended"
            # A gang fails whole when one pod is preempted or its node drained (the policy
            # ignores only the disrupted pod; its peers exit): that is no fault of the stage,
            # and a spot-instance gang would spend its retries on it.
            # (A single pod's disruptions fail no Job; a pressure eviction is the stage's
            # own doing: it outgrew its node.)
            spare = (
                outcome.retryable
                and stage.spec.nnodes > 1
                and tracker.disruptions > 0
                and tracker.evictions == 0
                and spared < SPARED_RETRIES
            )
            if not outcome.retryable or (counted == stage.spec.retries and not spare):
                mark_given_up(stage.output, f"{outcome.reason}: {outcome.message}"[:300])
                # the Job's annotation says failed too, not the last step it ran (a
                # deleted Job has nothing left to annotate)
                gone = outcome.reason in ("Deleted", "NoProgress", "Evicted")
                if not gone and (text := progress_text(stage.output)[1]):
                    self.annotate(namespace, name, text)
                raise StageFailed(stage.name, outcome.exit_code, report)
            if spare:
                spared += 1
                which = f"a pod was disrupted, not counted: {spared}/{SPARED_RETRIES}"
            else:
                counted += 1
                which = f"{counted}/{stage.spec.retries}"
            self.echo(
                f"{report}\n{head}: re-creating the Job ({which}); it resumes from the "
                "newest checkpoint"
            )

    def _clear_helpers(self, namespace: str, manifests: list[dict[str, Any]]) -> None:
        """Delete a finished stage's ConfigMap, Service and NetworkPolicy: nothing owns
        them, and the Job's ttlSecondsAfterFinished would leave them behind for good (a
        failed stage keeps them, to be looked at; a re-run or `rlhf cancel` removes those).
        Best effort: the stage has succeeded whatever this says."""
        apis = self._helper_apis()
        for manifest in manifests:
            if manifest["kind"] not in apis:
                continue
            _, delete = apis[manifest["kind"]]
            try:
                gone_already(delete, manifest["metadata"]["name"], namespace)
            except Exception as exc:  # noqa: BLE001 - not allowed, the API away: it stays
                self.echo(
                    f"warning: {manifest['kind']} {manifest['metadata']['name']} was left in "
                    f"namespace {namespace} ({str(exc)[:200]})"
                )

    def _helper_apis(self) -> dict[str, tuple[Callable, Callable]]:
        """How to list and delete each kind a stage makes beside its Job."""
        core, networking = self.core, self.networking
        return {
            "ConfigMap": (core.list_namespaced_config_map, core.delete_namespaced_config_map),
            "Service": (core.list_namespaced_service, core.delete_namespaced_service),
            "NetworkPolicy": (
                networking.list_namespaced_network_policy,
                networking.delete_namespaced_network_policy,
            ),
        }

    def running_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job of that name, when it exists and has not finished or been deleted."""
        from kubernetes.client.exceptions import ApiException

        try:
            found = self.api.sanitize_for_serialization(
                self.batch.read_namespaced_job(name, namespace)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return None if job_finished(found) else found

    def submit(self, plan: Plan, manifests: list[dict[str, Any]]) -> None:
        """Create the stage's objects; a finished or different Job of the same name goes first."""
        from kubernetes import utils
        from kubernetes.client.exceptions import ApiException

        namespace = plan.kubernetes.namespace
        for manifest in manifests:  # all checked before any is created: nothing left behind
            client_model(manifest)
        # the old Job goes before its ConfigMap changes: a pod it made meanwhile would run
        # the new config on the old image and GPUs
        [metadata] = [m["metadata"] for m in manifests if m["kind"] == "Job"]
        job, stage = metadata["name"], metadata["labels"]["kuberlhf.io/stage"]
        self._clear_job(namespace, job, metadata["labels"])
        check_not_cancelled(plan, stage)  # `rlhf cancel` while the old Job went
        for manifest in manifests:
            kind, name = manifest["kind"], manifest["metadata"]["name"]
            try:
                utils.create_from_dict(
                    self.api, manifest, namespace=namespace, _request_timeout=REQUEST_TIMEOUT
                )
            except utils.FailToCreateError as exc:
                if not all(
                    isinstance(e, ApiException) and e.status == 409 for e in exc.api_exceptions
                ):
                    raise
                if kind == "Job":  # cleared a moment ago: someone else made it meanwhile
                    raise TransientError(
                        f"Job {name} in namespace {namespace} was created by someone else "
                        "while this run replaced it (another `rlhf run` of the same run?); "
                        "run again to follow it or replace it"
                    ) from exc
                if kind == "ConfigMap":
                    self.core.replace_namespaced_config_map(name, namespace, manifest)
                elif kind == "Service":
                    self.core.patch_namespaced_service(name, namespace, manifest)
                elif kind == "NetworkPolicy":
                    self.networking.replace_namespaced_network_policy(name, namespace, manifest)
        # a cancel that listed the Jobs just before this one was made has marked the run
        # first: one of the two sees the other
        try:
            check_not_cancelled(plan, stage)
        except StageFailed:
            self._delete_job(namespace, job)
            raise

    def wait(
        self, plan: Plan, stage: PlannedStage, job_name: str, head: str
    ) -> tuple[StageTracker, Outcome]:
        """Follow the Job and its pods until the Job completes or fails."""
        namespace, selector = plan.kubernetes.namespace, run_selector(plan.run_id, stage.name)
        pod_selector = run_selector(plan.run_id, stage.name, pods=True)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        streams = [
            threading.Thread(
                target=self._stream,
                daemon=True,
                args=(self.batch.list_namespaced_job, namespace, selector, events, stop),
            ),
            threading.Thread(
                target=self._stream,
                daemon=True,
                args=(self.core.list_namespaced_pod, namespace, pod_selector, events, stop),
            ),
        ]
        for thread in streams:
            thread.start()
        tracker, last_line, last_metrics = StageTracker(job_name), "", ()
        idle_from, next_check, seen, warnings = time.monotonic(), 0.0, set(), []
        coming: set[str] = set()
        relisted_pods = False
        try:
            while (outcome := tracker.outcome()) is None or (
                outcome.retryable and not relisted_pods
            ):
                if outcome is not None:
                    # Failed without a 65 so far: the pods' own stream may not yet have
                    # brought the exit codes the Job's failure counted; read them once
                    # afresh before a bad input is taken for a retryable failure.
                    relisted_pods = True
                    self._read_pods(namespace, pod_selector, tracker)
                    continue
                try:
                    kind, event_type, obj = events.get(timeout=self.poll_s)
                    if isinstance(obj, Exception):
                        raise obj
                    if kind == "Job":
                        tracker.on_job(obj, deleted=event_type == "DELETED")
                    else:
                        tracker.on_pod(obj, deleted=event_type == "DELETED")
                except queue.Empty:
                    pass
                if tracker.busy():  # the stall clock runs while no pod runs
                    idle_from = time.monotonic()
                if time.monotonic() >= next_check:  # what keeps pods from being made or run
                    next_check = time.monotonic() + self.poll_s
                    found = self.raw_events(plan, tracker)
                    if under_way(found, coming):  # an image pull, a node being added
                        idle_from = time.monotonic()
                    for line in warnings_to_show(found, seen):
                        warnings.append(line)
                        self.echo(f"{head}: {line}")
                    waited = time.monotonic() - idle_from
                    limit = plan.kubernetes.stall_timeout_s
                    if (outcome := stalled(tracker, waited, limit, warnings)) is not None:
                        break
                line = tracker.progress()
                # a new line when the Job or the stage's newest synced step changes (not
                # for the elapsed time alone, which changes at every poll)
                step, metrics = progress_text(stage.output)
                if line != last_line or step != last_metrics:
                    self.echo(f"{head}: {line}" + (f" | {metrics}" if metrics else ""))
                    if step != last_metrics and metrics:
                        self.annotate(namespace, job_name, metrics)
                    last_line, last_metrics = line, step
        finally:
            stop.set()
        return tracker, outcome

    def _read_pods(self, namespace: str, selector: str, tracker: StageTracker) -> None:
        """The stage's pods as they are now, into ``tracker``; best effort (the outcome
        stands as the watch showed it)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            found = self.core.list_namespaced_pod(namespace, label_selector=selector)
        except (ApiException, HTTPError, OSError):
            return
        for pod in found.items:
            tracker.on_pod(self.api.sanitize_for_serialization(pod))

    def annotate(self, namespace: str, job_name: str, progress: str) -> None:
        """The progress on the Job itself, for `kubectl get jobs` with a custom column
        (the README has the command); best effort, like the line it repeats."""
        body = {"metadata": {"annotations": {PROGRESS_ANNOTATION: progress}}}
        try:
            self.batch.patch_namespaced_job(job_name, namespace, body)
        except Exception as exc:  # noqa: BLE001 - not allowed, the Job gone, the API away
            if not self.annotate_warned:
                self.annotate_warned = True
                self.echo(f"warning: no progress annotation on {job_name}: {str(exc)[:200]}")

    def raw_events(self, plan: Plan, tracker: StageTracker) -> list[dict[str, Any]]:
        """The events of the Job and its pods, as the API returns them; best effort (a Role
        without events, the API server away for a moment): the Job decides the outcome."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        out = []
        uids = {tracker.job_name: (tracker.job.get("metadata") or {}).get("uid", "")}
        uids.update({name: pod.uid for name, pod in sorted(tracker.pods.items())})
        for name, uid in uids.items():
            try:
                found = self.core.list_namespaced_event(
                    plan.kubernetes.namespace, field_selector=f"involvedObject.name={name}"
                )
            except (ApiException, HTTPError, OSError):
                continue
            out += own_events([self.api.sanitize_for_serialization(e) for e in found.items], uid)
        return out

    def events(self, plan: Plan, tracker: StageTracker) -> list[str]:
        return event_lines(self.raw_events(plan, tracker))

    def logs(self, plan: Plan, stage: PlannedStage, tail: int = 20) -> dict[str, str]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        namespace = plan.kubernetes.namespace
        try:
            pods = self.core.list_namespaced_pod(
                namespace, label_selector=run_selector(plan.run_id, stage.name, pods=True)
            )
        except (ApiException, HTTPError, OSError) as exc:  # the report goes on without them
            return {"(pods)": f"(no logs: {str(exc)[:200]})"}
        out = {}
        for pod in pods.items:
            try:
                out[pod.metadata.name] = self.core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container="stage", tail_lines=tail
                )
            except Exception as exc:  # a pod that never started has no log to give
                out[pod.metadata.name] = f"(no log: {exc})"
        return out

    def delete(self, plan: Plan) -> int:
        """Cancel a run: its Jobs (and their pods), ConfigMaps, Services and NetworkPolicies."""
        namespace = plan.kubernetes.namespace
        with api_errors(namespace):
            return self._delete_run(namespace, run_selector(plan.run_id))

    def _delete_run(self, namespace: str, selector: str) -> int:
        from kubernetes.client.exceptions import ApiException

        jobs = self.batch.list_namespaced_job(namespace, label_selector=selector).items
        for job in jobs:
            self._delete_job(namespace, job.metadata.name)
        # each gone already is fine: another `rlhf cancel`, the run's own clean-up; a kind
        # the Role may not list (Services and NetworkPolicies: a run of one-pod stages
        # makes none) is no reason to stop after the Jobs
        for kind, (list_fn, delete_fn) in self._helper_apis().items():
            try:
                found = list_fn(namespace, label_selector=selector).items
            except ApiException as exc:
                if exc.status != 403 or kind == "ConfigMap":
                    raise
                continue
            for item in found:
                gone_already(delete_fn, item.metadata.name, namespace)
        return len(jobs)

    # --- internals ----------------------------------------------------------------------

    def _delete_job(self, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete a Job and (foreground) its pods; False when there was none. With ``uid``,
        only that Job: one made again under its name meanwhile is another submitter's."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        options = client.V1DeleteOptions(
            propagation_policy="Foreground",
            preconditions=client.V1Preconditions(uid=uid) if uid else None,
        )
        try:
            self.batch.delete_namespaced_job(name, namespace, body=options)
        except ApiException as exc:
            if exc.status == 404:
                return False
            if exc.status == 409 and uid:
                raise TransientError(
                    f"Job {name} in namespace {namespace} was made again by someone else "
                    "while this run replaced it (another `rlhf run` of the same run?); "
                    "run again to follow it or replace it"
                ) from None
            raise
        return True

    def _clear_job(self, namespace: str, name: str, labels: dict[str, str]) -> None:
        """Delete the Job of that name, this run's stage's (``labels``: its run and stage),
        and wait until it has gone: its pods first get their grace period to checkpoint
        (the chart's terminationGracePeriodSeconds, 600 s by default). A Job of another
        run or stage under the name (run "team" stage "a-sft" and run "team-a" stage
        "sft" are both team-a-sft) is refused, not deleted."""
        from kubernetes.client.exceptions import ApiException

        try:
            job = self.batch.read_namespaced_job(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        owner = {
            k: (job.metadata.labels or {}).get(k) for k in ("kuberlhf.io/run", "kuberlhf.io/stage")
        }
        if owner != {k: labels[k] for k in owner}:
            raise StageFailed(
                labels["kuberlhf.io/stage"],
                EXIT_BAD_INPUT,
                f"Job {name} in namespace {namespace} is not this stage's (its labels say run "
                f"{owner['kuberlhf.io/run']!r}, stage {owner['kuberlhf.io/stage']!r}); it is "
                "left as it is: give this run another run id or the stage another name",
            )
        grace = job.spec.template.spec.termination_grace_period_seconds
        timeout_s = (30 if grace is None else grace) + 120
        if not self._delete_job(namespace, name, job.metadata.uid):
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.batch.read_namespaced_job(name, namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            time.sleep(1)
        raise StageFailed(name, 1, f"the previous Job {name} was not deleted in {timeout_s:.0f} s")

    def _stream(
        self, list_fn, namespace: str, selector: str, out: queue.Queue, stop: threading.Event
    ) -> None:
        """List, then watch from that resource version; re-list when it expires (410 Gone)
        or the API server was out of reach (a restart, a load balancer's failover) for less
        than ``API_OUTAGE_S``."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        kind = "Job" if "job" in list_fn.__name__ else "Pod"
        version, unreachable_since = None, None
        known: dict[str, dict] = {}  # what the last list and the watch since then showed
        while not stop.is_set():
            try:
                if version is None:
                    listed = list_fn(namespace, label_selector=selector)
                    version, unreachable_since = listed.metadata.resource_version, None
                    items = [self.api.sanitize_for_serialization(i) for i in listed.items]
                    for event_type, obj in relisted(known, items):
                        out.put((kind, event_type, obj))
                for event in watch.Watch().stream(
                    list_fn,
                    namespace,
                    label_selector=selector,
                    resource_version=version,
                    timeout_seconds=WATCH_S,
                ):
                    if stop.is_set():
                        return
                    version = event["object"].metadata.resource_version
                    obj = self.api.sanitize_for_serialization(event["object"])
                    if event["type"] == "DELETED":
                        known.pop(identity(obj), None)
                    else:
                        known[identity(obj)] = obj
                    out.put((kind, event["type"], obj))
            except Exception as exc:  # noqa: BLE001 - a dead stream must say so, or the wait hangs
                if isinstance(exc, ApiException) and exc.status == 410:
                    version = None  # the watch expired: start over from a fresh list
                    continue
                if stop.is_set():  # the wait is over: a connection closing is no news
                    return
                if isinstance(exc, ApiException | HTTPError | OSError) and api_unavailable(exc):
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since <= API_OUTAGE_S:
                        version = None  # what happened meanwhile comes with a fresh list
                        stop.wait(min(self.poll_s, 5.0))
                        continue
                out.put((kind, "ERROR", exc))
                return


# The server ends a watch after WATCH_S; no read waits longer than REQUEST_TIMEOUT's (the
# client's default is no timeout at all: an API server gone without closing its connections,
# a node powered off or a load balancer dropping packets, held a watch, and `rlhf run` with
# it, for ever; a read timeout is an outage like any other, and the watch lists again).
WATCH_S = 60
REQUEST_TIMEOUT = (10.0, WATCH_S + 30.0)  # (connect, read) seconds


class Timed:
    """A Kubernetes API group whose every call has ``REQUEST_TIMEOUT`` unless it gives its
    own (``watch.Watch`` reads the wrapped method's name and documented return type)."""

    def __init__(self, api) -> None:
        self._api = api

    def __getattr__(self, name: str):
        method = getattr(self._api, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def call(*args, **kwargs):
            kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
            return method(*args, **kwargs)

        return call


SPARED_RETRIES = 10  # re-creations after a disruption, beyond a stage's `retries`


def gpus_and_processes(job: dict[str, Any]) -> str | None:
    """Why the Job's pods would waste or lack GPUs, or None: every process takes the GPU of
    its local rank, so a pod with GPUs runs one process per GPU (more processes fail at
    their first CUDA call, "invalid device ordinal"; fewer leave GPUs idle). On one
    machine (the local backend) the chart's GPU count means nothing and is not checked."""
    pod = job["spec"]["template"]
    limits = (pod["spec"]["containers"][0].get("resources") or {}).get("limits") or {}
    gpus = sum(int(value) for name, value in limits.items() if name.endswith("/gpu"))
    launch = json.loads(pod["metadata"]["annotations"]["kuberlhf.io/launch"])
    processes = int(launch["env"].get("PET_NPROC_PER_NODE", 1))
    if gpus and processes != gpus:
        return (
            f"a pod with {gpus} GPUs and {processes} processes: each process trains on one "
            f"GPU of its own; give nproc_per_node: {gpus} (or values.gpus: {processes})"
        )
    return None


def finished_unseen(plan: Plan, stage: PlannedStage) -> bool:
    """A Job gone without `rlhf cancel` whose stage has published its output: it completed
    and went (its ttlSecondsAfterFinished) while no watch was open, and succeeded."""
    if store.exists(store.join(plan.run_uri, CANCELLED)):
        return False
    return up_to_date(stage.stage, stage.config) is not None


@contextmanager
def api_errors(namespace: str) -> Iterator[None]:
    """A Kubernetes API failure as a clear error, not the client's traceback: refused (a
    Role without a verb, a namespace that does not exist, a quota) is exit 65, the API
    server out of reach is exit 75."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.utils import FailToCreateError
    from urllib3.exceptions import HTTPError

    try:
        yield
    except FailToCreateError as exc:
        raise _api_error(exc.api_exceptions[0], namespace) from None
    except ApiException as exc:
        raise _api_error(exc, namespace) from None
    except HTTPError as exc:  # the client's connection errors (an OSError is a bug here)
        raise TransientError(
            f"kubernetes: the API server could not be reached ({type(exc).__name__}: "
            f"{str(exc)[:300]}); check the kubeconfig's server and the network"
        ) from None


def _api_error(exc, namespace: str) -> Exception:
    """What the API server said: its status, reason and message (the body's JSON)."""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = ""
    text = (
        f"kubernetes: the API server answered {exc.status} {exc.reason} in namespace "
        f"{namespace}" + (f": {message}" if message else "")
    )
    if api_unavailable(exc):
        return TransientError(text)
    hint = {
        401: " (the kubeconfig's credentials were not accepted)",
        403: " (the Role lacks this verb on this resource)",
        404: " (does the namespace exist?)",
    }.get(exc.status, "")
    return BadInputError(text + hint)


def gone_already(delete, name: str, namespace: str) -> None:
    """Delete an object; one that is gone already (404) is what was wanted."""
    from kubernetes.client.exceptions import ApiException

    try:
        delete(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def api_unavailable(exc: Exception) -> bool:
    """Whether an error says the API server is away for now rather than that the request is
    wrong: no connection, a TLS failure (the client's status 0), 429, or a 5xx from a
    control plane restarting (503 while it starts, 500 when etcd changes leader)."""
    from kubernetes.client.exceptions import ApiException

    if not isinstance(exc, ApiException):
        return True
    return not exc.status or exc.status == 429 or exc.status >= 500


PROGRESS_ANNOTATION = "kuberlhf.io/progress"
API_OUTAGE_S = 300.0  # how long the watch lists again before the run gives up on the API


def progress_text(output: str) -> tuple[tuple, str]:
    """The stage's newest synced step (and its time), and the line about it the submitter
    prints and puts on the Job: step, times and metrics, shortened."""
    try:
        progress = read_progress(output)
    except Exception:  # progress is best effort; the Job's state is what decides
        return (), ""
    if progress is None:
        return (), ""
    step = (progress.step, progress.metrics.get("time"), progress.state)
    return step, f"{progress.line()} | {summary(progress.metrics, limit=4)}"[:250]
