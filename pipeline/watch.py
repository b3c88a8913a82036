"""What a stage's Job and Pods say: progress, success, and why it failed.

Pure functions over Job and Pod objects as the API returns them (dicts), fed by
the Kubernetes backend's watch streams; tested on recorded sequences of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jobs.errors import EXIT_BAD_INPUT

EXIT_CANCELLED = 130  # as a shell reports a run stopped by its user
EVICTIONS = 3  # kubelet evictions of one Job's pods that end the stage
BAD_INPUT = "bad config or input (not retried)"  # the same words on every backend
# Warning events that say the Job cannot make pods or the pods cannot run.
BLOCKING = {
    "FailedCreate",
    "FailedScheduling",
    "ErrImagePull",
    "ImagePullBackOff",
    "Failed",
    "FailedMount",
    "FailedAttachVolume",
    "InspectFailed",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
}


@dataclass
class PodView:
    name: str
    phase: str
    uid: str = ""
    restarts: int = 0
    exit_code: int | None = None
    reason: str = ""
    disrupted: bool = False
    evicted: bool = False  # by the kubelet for node pressure (the pod's reason "Evicted")


@dataclass
class Outcome:
    succeeded: bool
    retryable: bool
    reason: str  # Kubernetes' word for it: Complete, PodFailurePolicy, DeadlineExceeded, ...
    message: str
    exit_code: int = 0  # what `rlhf run` exits with: the stage's own code where it gave one


@dataclass
class StageTracker:
    """The newest state of one stage's Job and its pods."""

    job_name: str
    job: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, PodView] = field(default_factory=dict)
    disruptions: int = 0
    evictions: int = 0  # of them, by the kubelet (node memory or disk pressure)
    deleted: bool = False
    started: bool = False  # a pod of the Job has run
    # Pods gone from the Job, as last seen: a pod deleted as its Job failed still said its
    # exit code (a gang's 65 often comes only in the DELETED event).
    gone: dict[str, PodView] = field(default_factory=dict)
    # The Job and its pods come on two watch streams, in no fixed order: a Job failed
    # while a pod still runs waits up to ``settle_s`` for that pod's exit code.
    settle_s: float = 60.0
    failed_seen: float | None = None

    def on_job(self, job: dict[str, Any], deleted: bool = False) -> None:
        if job["metadata"]["name"] != self.job_name:
            return
        self.job = job
        # Deleted (rlhf cancel, kubectl delete): with foreground propagation the Job first
        # gets a deletion timestamp, then goes; it never completes or fails.
        if deleted or job["metadata"].get("deletionTimestamp"):
            self.deleted = True

    def on_pod(self, pod: dict[str, Any], deleted: bool = False) -> None:
        view = pod_view(pod)
        known = self.pods.get(view.name)
        if view.disrupted and not (known and known.disrupted):
            self.disruptions += 1
            self.evictions += view.evicted
        if view.phase not in ("Pending", "Unknown"):
            self.started = True
        if deleted:  # replaced (a disruption) or cleaned up: no longer part of the stage
            self.pods.pop(view.name, None)
            self.gone[view.name] = view
        else:
            self.pods[view.name] = view

    def outcome(self, now: float | None = None) -> Outcome | None:
        if self.deleted:
            return Outcome(
                False,
                False,
                "Deleted",
                f"the Job {self.job_name} was deleted (rlhf cancel or kubectl delete); "
                "the run stops here",
                EXIT_CANCELLED,
            )
        if not self.job:
            return None
        if self.evictions >= EVICTIONS:
            # The podFailurePolicy ignores disruptions, the kubelet's pressure evictions
            # among them: a stage that outgrows its node's memory or disk would be
            # replaced, and evicted, for ever.
            return Outcome(
                False,
                False,
                "Evicted",
                f"the kubelet evicted {self.evictions} pods of the Job (node memory or disk "
                "pressure: the stage uses more than its requests); give it more "
                "resources.requests (memory, ephemeral-storage) or a smaller scratch use",
                1,
            )
        found = job_outcome(self.job, [*self.gone.values(), *self.pods.values()])
        if found is None or not found.retryable:
            return found
        # Failed, no 65 among the exit codes yet: a pod still stopping may be about to say
        # one (before Kubernetes 1.31 the Job fails at a peer's exit 1 and then deletes
        # the rest), and a retried bad input fails again. The Job's counts say whether
        # pods are stopping (`terminating` where the server keeps it); a pod the counts
        # say has ended but whose update the pod stream has not brought is the backend's
        # to list afresh.
        status = self.job.get("status", {})
        if "terminating" in status:
            stopping = status.get("active", 0) + status["terminating"] > 0
        else:
            stopping = any(p.phase in ("Pending", "Running", "Unknown") for p in self.pods.values())
        if stopping:
            now = time.monotonic() if now is None else now
            if self.failed_seen is None:
                self.failed_seen = now
            if now - self.failed_seen < self.settle_s:
                return None
        return found

    def busy(self) -> bool:
        """A pod of the Job is running, or the Job waits in a queue (suspended until a
        scheduler such as Kueue admits it): not stalled, whatever the time."""
        if self.job.get("spec", {}).get("suspend"):
            return True
        return any(p.phase == "Running" for p in self.pods.values())

    def progress(self) -> str:
        if not self.job:
            return "waiting for the Job"
        if self.job.get("spec", {}).get("suspend"):
            return "suspended (waiting for admission)"
        status = self.job.get("status", {})
        pods = ", ".join(
            f"{p.name.rsplit('-', 1)[-1]}:{p.phase}"
            + (f" (restarts {p.restarts})" if p.restarts else "")
            for p in sorted(self.pods.values(), key=lambda p: p.name)
        )
        counts = f"active {status.get('active', 0)}, failed {status.get('failed', 0)}"
        extra = f", {self.disruptions} disrupted" if self.disruptions else ""
        return f"{counts}{extra}" + (f" | pods {pods}" if pods else "")


def pod_view(pod: dict[str, Any]) -> PodView:
    status = pod.get("status", {})
    metadata = pod["metadata"]
    view = PodView(metadata["name"], status.get("phase", "Pending"), metadata.get("uid", ""))
    # The pod's own reason, not its DisruptionTarget's: the kubelet gives that condition
    # the reason TerminationByKubelet for a graceful node shutdown (a spot node going) too.
    view.evicted = status.get("reason") == "Evicted"
    for container in status.get("containerStatuses", []) or []:
        if container.get("name") != "stage" and len(status["containerStatuses"]) > 1:
            continue
        view.restarts = container.get("restartCount", 0)
        terminated = (container.get("state") or {}).get("terminated") or (
            container.get("lastState") or {}
        ).get("terminated")
        if terminated:
            view.exit_code = terminated.get("exitCode")
            view.reason = terminated.get("reason", "")
        if (container.get("state") or {}).get("terminated") and view.phase == "Running":
            view.phase = "Terminated"  # the pod's phase lags its container's end
    for condition in status.get("conditions", []) or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            view.disrupted = True
            view.reason = condition.get("reason", "DisruptionTarget")
    return view


def job_outcome(job: dict[str, Any], pods: list[PodView]) -> Outcome | None:
    """Success, or a failure said to be worth retrying (by re-creating the Job) or not."""
    conditions = {
        c["type"]: c
        for c in job.get("status", {}).get("conditions", []) or []
        if c.get("status") == "True"
    }
    if "Complete" in conditions:
        return Outcome(True, False, "Complete", "finished", 0)
    failed = conditions.get("Failed")
    target = conditions.get("FailureTarget")
    # FailureTarget comes first (Kubernetes 1.31+), Failed once every pod has ended. A
    # podFailurePolicy's decides; any other waits for the pods' exit codes: in a gang one
    # pod's 65 can come after another's 1 (its peer gone) has already failed the Job.
    if failed is None and target is not None and target.get("reason") == "PodFailurePolicy":
        failed = target
    if failed is None:
        return None
    reason = failed.get("reason", "Failed")
    message = failed.get("message", "")
    exit_codes = sorted({p.exit_code for p in pods if p.exit_code not in (None, 0)})
    if reason == "PodFailurePolicy" or EXIT_BAD_INPUT in exit_codes:
        return Outcome(
            False,
            False,
            reason,
            f"exit code {EXIT_BAD_INPUT}: {BAD_INPUT}. {message}".strip(),
            EXIT_BAD_INPUT,
        )
    if reason == "DeadlineExceeded":
        return Outcome(
            False,
            False,
            reason,
            f"ran past activeDeadlineSeconds ({job['spec'].get('activeDeadlineSeconds')}"
            f" s); raise it or give the stage more resources. {message}",
            1,
        )
    codes = f"exit codes {exit_codes}" if exit_codes else "no exit code"
    return Outcome(
        False, True, reason, f"{codes}; {message}".strip("; "), exit_codes[0] if exit_codes else 1
    )


def stalled(tracker: StageTracker, idle_s: float, limit_s: float, warnings: list[str]):
    """An outcome when no pod of the Job has been running for ``limit_s`` seconds, the Job
    not waiting in a queue (pods that cannot be created or scheduled, an image that cannot
    be pulled; a replacement pod stuck likewise after the first ran), else None.
    ``idle_s``: the time since the tracker was last ``busy``, or since the wait began."""
    if tracker.busy() or idle_s < limit_s:
        return None
    why = "; ".join(warnings[-3:]) or "no warning events"
    if tracker.started:
        what = f"no pod of the Job has been running for {idle_s:.0f} s"
    else:
        what = f"no pod of the Job ran in {idle_s:.0f} s"
    return Outcome(False, False, "NoProgress", f"{what} (kubernetes.stall_timeout_s): {why}", 1)


def relisted(known: dict[str, dict], items: list[dict]) -> list[tuple[str, dict]]:
    """The events a fresh list stands for, after a watch expired (410 Gone): each object
    listed (ADDED; their newest state), and each object ``known`` from before that the list
    no longer has (DELETED: it went while nothing watched, e.g. the Job ``rlhf cancel``
    deleted). ``known`` (uid -> object) becomes the list."""
    ids = {identity(item) for item in items}
    gone = [("DELETED", obj) for key, obj in known.items() if key not in ids]
    known.clear()
    known.update({identity(item): item for item in items})
    return gone + [("ADDED", item) for item in items]


def identity(obj: dict) -> str:
    """An object's uid (a Job deleted and made again under its name is another object)."""
    metadata = obj["metadata"]
    return metadata.get("uid") or metadata["name"]


def event_time(event: dict[str, Any]) -> datetime:
    """When an event happened, whichever of its time fields the server filled (their
    precisions differ: compared as times, not as strings)."""
    for key in ("eventTime", "lastTimestamp", "firstTimestamp"):
        value = event.get(key)
        if value:
            return value if isinstance(value, datetime) else datetime.fromisoformat(value)
    created = (event.get("metadata") or {}).get("creationTimestamp")
    if created:
        return created if isinstance(created, datetime) else datetime.fromisoformat(created)
    return datetime.min.replace(tzinfo=UTC)


# Where an event comes in a pod's life: the servers give some events' times to the second
# only (lastTimestamp) and others' to the microsecond (eventTime), so within one second the
# life cycle decides ("Started" at 10:00:05 came after "Scheduled" at 10:00:05.3).
LIFE_CYCLE = {
    "SuccessfulCreate": 0,
    "FailedCreate": 0,
    "Scheduled": 1,
    "FailedScheduling": 1,
    "Pulling": 2,
    "Pulled": 3,
    "Failed": 3,
    "ErrImagePull": 3,
    "Created": 4,
    "Started": 5,
    "BackOff": 6,
    "Killing": 7,
    "Completed": 8,
}


def event_order(event: dict[str, Any]) -> tuple:
    """Events sort by the second they happened in, then by the life cycle, then by time."""
    when = event_time(event)
    return (when.replace(microsecond=0), LIFE_CYCLE.get(event.get("reason") or "", 6), when)


def own_events(events: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """The events of this very object, not of an earlier one of its name: a Job re-made
    under its name (a retry, a re-run) would otherwise show the old one's events, which the
    API keeps for an hour. Events that name no uid are kept."""
    if not uid:
        return events
    return [e for e in events if (e.get("involvedObject") or {}).get("uid") in (None, "", uid)]


def event_lines(events: list[dict[str, Any]]) -> list[str]:
    """Events (as the API returns them) in the order they happened, one line each."""
    return [
        f"{(e.get('involvedObject') or {}).get('name', '?')}: {e.get('type')} "
        f"{e.get('reason')}: {e.get('message')}"
        for e in sorted(events, key=event_order)
    ]


def event_id(event: dict[str, Any]) -> str:
    return (event.get("metadata") or {}).get("uid") or str(event_time(event))


def event_key(event: dict[str, Any]) -> str:
    """One event at one count: a repeated event (its count raised) is news again."""
    return f"{event_id(event)}/{event.get('count')}"


def warnings_to_show(events: list[dict[str, Any]], seen: set[str]) -> list[str]:
    """The Warning events not shown yet that say pods cannot be made or cannot run."""
    out = []
    for event in sorted(events, key=event_order):
        key = event_key(event)
        if event.get("type") != "Warning" or key in seen:
            continue
        if event.get("reason") not in BLOCKING and "quota" not in str(event.get("message")):
            continue
        seen.add(key)
        name = (event.get("involvedObject") or {}).get("name", "?")
        out.append(f"{name}: Warning {event.get('reason')}: {event.get('message')}")
    return out


# Normal events that say a pod is on its way though none runs yet: a large image being
# pulled (the CUDA image is 7.7 GB), the cluster autoscaler adding a node for it.
UNDER_WAY = {"Pulling", "TriggeredScaleUp", "Pulled", "Scheduled"}


def under_way(events: list[dict[str, Any]], seen: set[str]) -> bool:
    """Whether a new event says a pod of the stage is on its way (the stall clock restarts).
    Each event counts once: a pull the kubelet retries (a wrong tag: Pulling again, every
    few minutes, with a higher count) is no progress."""
    new = False
    for event in events:
        if event.get("reason") not in UNDER_WAY:
            continue
        key = event_id(event)
        if key not in seen:
            seen.add(key)
            new = True
    return new


def explain(
    tracker: StageTracker, outcome: Outcome, events: list[str], logs: dict[str, str], tail: int = 20
) -> str:
    """A failure report a person can act on: what Kubernetes said, the pods' exit codes,
    their events, and the last lines of their logs."""
    lines = [f"Job {tracker.job_name} failed ({outcome.reason}): {outcome.message}"]
    for pod in sorted(tracker.pods.values(), key=lambda p: p.name):
        code = "" if pod.exit_code is None else f", exit code {pod.exit_code}"
        reason = f" ({pod.reason})" if pod.reason else ""
        lines.append(f"  pod {pod.name}: {pod.phase}{code}{reason}")
    for pod in sorted(tracker.gone.values(), key=lambda p: p.name):
        if pod.exit_code not in (None, 0) and pod.name not in tracker.pods:
            lines.append(f"  pod {pod.name} (deleted): exit code {pod.exit_code}")
    if events:
        lines.append("  events:")
        lines += [f"    {event}" for event in events[-10:]]
    for name, text in sorted(logs.items()):
        last = text.rstrip().splitlines()[-tail:]
        if last:
            lines.append(f"  last log lines of {name}:")
            lines += [f"    {line}" for line in last]
    return "\n".join(lines)
