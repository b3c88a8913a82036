"""The kubernetes backend: each stage as the Job its chart renders, watched to the end.

Nothing here builds a Job: the manifests come from the stage charts (pipeline/charts.py)
and are created as they are. Jobs and Pods are followed with the watch API
(re-listing when the resource version expires); progress, outcomes and failure reports
come from pipeline/watch.py. A failed training gang is re-created whole, and resumes from
its newest checkpoint; stages whose manifests are complete in the store are skipped.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from jobs import store
from jobs.contract import METRICS, PROGRESS, Manifest
from pipeline.backends import StageFailed, run_in_order
from pipeline.charts import render_stage
from pipeline.config import Plan, PlannedStage
from pipeline.watch import Outcome, StageTracker, explain


def run_selector(run_id: str, stage: str | None = None) -> str:
    selector = f"kuberlhf.io/run={run_id}"
    return f"{selector},kuberlhf.io/stage={stage}" if stage else selector


class KubernetesBackend:
    def __init__(
        self, context: str | None = None, echo: Callable[[str], None] = print, poll_s: float = 10.0
    ) -> None:
        from kubernetes import client, config

        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config(context=context)
        self.api = client.ApiClient()
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.echo, self.poll_s = echo, poll_s

    # --- the client interface -------------------------------------------------------

    def run(self, plan: Plan, only: list[str] | None = None) -> dict[str, Manifest]:
        """Submit every stage in order and wait for each (a stage needs its inputs done)."""
        return run_in_order(
            plan, only, self.echo, lambda stage, head: self.run_stage(plan, stage, head)
        )

    def run_stage(self, plan: Plan, stage: PlannedStage, head: str) -> None:
        manifests = render_stage(plan, stage)
        [job] = [m for m in manifests if m["kind"] == "Job"]
        name = job["metadata"]["name"]
        for attempt in range(stage.spec.retries + 1):
            self.submit(plan, manifests)
            self.echo(f"{head}: Job {name} in namespace {plan.kubernetes.namespace}")
            tracker, outcome = self.wait(plan, stage, name, head)
            if outcome.succeeded:
                return
            report = explain(tracker, outcome, self.events(plan, tracker), self.logs(plan, stage))
            if not outcome.retryable or attempt == stage.spec.retries:
                raise StageFailed(stage.name, 1, report)
            self.echo(
                f"{report}\n{head}: re-creating the Job ({attempt + 1}/{stage.spec.retries});"
                " it resumes from the newest checkpoint"
            )

    def submit(self, plan: Plan, manifests: list[dict[str, Any]]) -> None:
        """Create the stage's objects; a finished or different Job of the same name goes first."""
        from kubernetes import utils
        from kubernetes.client.exceptions import ApiException

        namespace = plan.kubernetes.namespace
        for manifest in manifests:
            kind, name = manifest["kind"], manifest["metadata"]["name"]
            if kind == "Job":
                self._clear_job(namespace, name)
            try:
                utils.create_from_dict(self.api, manifest, namespace=namespace)
            except utils.FailToCreateError as exc:
                if not all(
                    isinstance(e, ApiException) and e.status == 409 for e in exc.api_exceptions
                ):
                    raise
                if kind == "ConfigMap":
                    self.core.replace_namespaced_config_map(name, namespace, manifest)
                elif kind == "Service":
                    self.core.patch_namespaced_service(name, namespace, manifest)

    def wait(
        self, plan: Plan, stage: PlannedStage, job_name: str, head: str
    ) -> tuple[StageTracker, Outcome]:
        """Follow the Job and its pods until the Job completes or fails."""
        namespace, selector = plan.kubernetes.namespace, run_selector(plan.run_id, stage.name)
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
                args=(self.core.list_namespaced_pod, namespace, selector, events, stop),
            ),
        ]
        for thread in streams:
            thread.start()
        tracker, last_line, last_metrics = StageTracker(job_name), "", ""
        try:
            while (outcome := tracker.outcome()) is None:
                try:
                    kind, event_type, obj = events.get(timeout=self.poll_s)
                    if isinstance(obj, Exception):
                        raise obj
                    if kind == "Job":
                        tracker.on_job(obj)
                    else:
                        tracker.on_pod(obj, deleted=event_type == "DELETED")
                except queue.Empty:
                    pass
                line = tracker.progress()
                metrics = newest_metrics(stage.output)
                if line != last_line or metrics != last_metrics:
                    self.echo(f"{head}: {line}" + (f" | {metrics}" if metrics else ""))
                    last_line, last_metrics = line, metrics
        finally:
            stop.set()
        return tracker, outcome

    def events(self, plan: Plan, tracker: StageTracker) -> list[str]:
        namespace, out = plan.kubernetes.namespace, []
        for name in [tracker.job_name, *sorted(tracker.pods)]:
            found = self.core.list_namespaced_event(
                namespace, field_selector=f"involvedObject.name={name}"
            )
            for event in sorted(found.items, key=lambda e: str(e.last_timestamp or e.event_time)):
                out.append(f"{name}: {event.type} {event.reason}: {event.message}")
        return out

    def logs(self, plan: Plan, stage: PlannedStage, tail: int = 20) -> dict[str, str]:
        namespace = plan.kubernetes.namespace
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=run_selector(plan.run_id, stage.name)
        )
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
        """Cancel a run: its Jobs (and their pods), ConfigMaps and Services."""
        namespace, selector = plan.kubernetes.namespace, run_selector(plan.run_id)
        jobs = self.batch.list_namespaced_job(namespace, label_selector=selector).items
        for job in jobs:
            self.batch.delete_namespaced_job(
                job.metadata.name, namespace, propagation_policy="Foreground"
            )
        for config_map in self.core.list_namespaced_config_map(
            namespace, label_selector=selector
        ).items:
            self.core.delete_namespaced_config_map(config_map.metadata.name, namespace)
        for service in self.core.list_namespaced_service(namespace, label_selector=selector).items:
            self.core.delete_namespaced_service(service.metadata.name, namespace)
        return len(jobs)

    # --- internals ----------------------------------------------------------------------

    def _clear_job(self, namespace: str, name: str, timeout_s: float = 300) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
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
        """List, then watch from that resource version; re-list when it expires (410 Gone)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        kind = "Job" if "job" in list_fn.__name__ else "Pod"
        version = None
        while not stop.is_set():
            try:
                if version is None:
                    listed = list_fn(namespace, label_selector=selector)
                    version = listed.metadata.resource_version
                    for item in listed.items:
                        out.put((kind, "ADDED", self.api.sanitize_for_serialization(item)))
                for event in watch.Watch().stream(
                    list_fn,
                    namespace,
                    label_selector=selector,
                    resource_version=version,
                    timeout_seconds=60,
                ):
                    if stop.is_set():
                        return
                    if event["type"] == "ERROR":
                        version = None  # the watch expired: start over from a fresh list
                        break
                    version = event["object"].metadata.resource_version
                    out.put(
                        (kind, event["type"], self.api.sanitize_for_serialization(event["object"]))
                    )
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                out.put((kind, "ERROR", exc))
                return


def newest_metrics(output: str) -> str:
    """The newest line of the stage's metrics so far, shortened."""
    uri = store.join(output, PROGRESS, METRICS)
    try:
        if not store.exists(uri):
            return ""
        lines = store.read_text(uri).strip().splitlines()
    except Exception:  # progress is best effort; the Job's state is what decides
        return ""
    if not lines:
        return ""
    record = json.loads(lines[-1])
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in record.items()
        if k != "time"
    )
