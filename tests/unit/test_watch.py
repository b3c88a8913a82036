"""Progress and failure explanations from recorded sequences of Job and Pod objects (the
backend's wiring on the same recordings: test_kubernetes_backend.py)."""

from __future__ import annotations

import copy

import yaml

from pipeline.backends.kubernetes import job_finished, same_config
from pipeline.watch import (
    EXIT_CANCELLED,
    StageTracker,
    event_lines,
    explain,
    own_events,
    relisted,
    stalled,
    under_way,
    warnings_to_show,
)
from tests.conftest import FIXTURES


def replay(name: str) -> tuple[StageTracker, list[str]]:
    tracker, progress = StageTracker("demo-sft"), []
    for event in yaml.safe_load((FIXTURES / "k8s" / f"{name}.yaml").read_text()):
        obj = event["object"]
        if obj["kind"] == "Job":
            tracker.on_job(obj, deleted=event["type"] == "DELETED")
        else:
            tracker.on_pod(obj, deleted=event["type"] == "DELETED")
        progress.append(tracker.progress())
    return tracker, progress


def test_success():
    tracker, progress = replay("success")
    outcome = tracker.outcome()
    assert outcome.succeeded and outcome.reason == "Complete"
    assert "pods x7k2p:Running" in progress[3]


def test_retry_after_a_disruption_is_not_a_failure():
    tracker, progress = replay("retry_after_disruption")
    assert tracker.disruptions == 1
    assert any("1 disrupted" in line for line in progress)
    assert tracker.outcome().succeeded
    assert set(tracker.pods) == {"demo-sft-d3e4f"}  # the preempted pod was replaced


def test_pods_the_kubelet_keeps_evicting_end_the_stage():
    """Disruptions are not failures (the podFailurePolicy ignores them), but the kubelet's
    memory or disk pressure evictions of a stage that outgrows its node would replace its
    pod for ever: the third ends the stage, with what to do. Preemptions and graceful node
    shutdowns (a spot node going: the same TerminationByKubelet condition, but the pod is
    not "Evicted") do not count."""
    events = yaml.safe_load((FIXTURES / "k8s" / "retry_after_disruption.yaml").read_text())
    job = copy.deepcopy(events[0]["object"])
    [evicted] = [
        e["object"]
        for e in events
        if e["object"]["kind"] == "Pod"
        and any(
            c["type"] == "DisruptionTarget" for c in e["object"]["status"].get("conditions", [])
        )
    ][:1]
    tracker = StageTracker("demo-sft")
    tracker.on_job(job)
    for number in range(7):
        pod = copy.deepcopy(evicted)
        pod["metadata"]["name"] = f"demo-sft-{number}"
        # a preemption, three node shutdowns, then the kubelet's pressure evictions
        for condition in pod["status"]["conditions"]:
            if condition["type"] == "DisruptionTarget" and number >= 1:
                condition["reason"] = "TerminationByKubelet"
        if number >= 4:
            pod["status"]["reason"] = "Evicted"
        tracker.on_pod(pod)
        if number < 6:
            assert tracker.outcome() is None, number
    outcome = tracker.outcome()
    assert tracker.disruptions == 7 and tracker.evictions == 3
    assert not outcome.retryable and outcome.reason == "Evicted", outcome
    assert "resources.requests" in outcome.message


def test_non_retryable_failure_names_the_exit_code():
    tracker, _ = replay("bad_input")
    outcome = tracker.outcome()
    assert not outcome.succeeded and not outcome.retryable
    assert outcome.reason == "PodFailurePolicy"
    report = explain(
        tracker,
        outcome,
        events=["Warning BackOff: Back-off restarting failed container"],
        logs={"demo-sft-q9w8e": "loading\nerror: data.yaml: sources.0.format: bad\n"},
    )
    assert "exit code 65: bad config or input (not retried)" in report
    assert outcome.exit_code == 65
    assert "pod demo-sft-q9w8e: Failed, exit code 65" in report
    assert "error: data.yaml: sources.0.format: bad" in report
    assert "Back-off restarting failed container" in report


def test_deadline_exceeded_is_final_and_says_which_deadline():
    tracker, _ = replay("deadline_exceeded")
    outcome = tracker.outcome()
    assert not outcome.retryable and outcome.reason == "DeadlineExceeded"
    assert "activeDeadlineSeconds (3600 s)" in outcome.message


def test_a_lost_rank_fails_the_gang_and_is_worth_a_new_job():
    tracker, _ = replay("gang_rank_lost")
    outcome = tracker.outcome()
    assert not outcome.succeeded and outcome.retryable
    assert "exit codes [137]" in outcome.message
    report = explain(tracker, outcome, events=[], logs={})
    assert "pod demo-sft-1-fghij: Failed, exit code 137 (OOMKilled)" in report


def test_failure_target_counts_before_failed_is_set():
    tracker, _ = replay("bad_input")
    tracker.job["status"]["conditions"] = tracker.job["status"]["conditions"][:1]
    assert tracker.outcome().reason == "PodFailurePolicy"


def test_a_cancelled_run_ends_at_once_and_is_not_retried():
    tracker, progress = replay("cancelled")
    assert tracker.outcome() is not None and progress  # already at the deletion timestamp
    outcome = tracker.outcome()
    assert not outcome.succeeded and not outcome.retryable
    assert outcome.exit_code == EXIT_CANCELLED
    assert "was deleted (rlhf cancel or kubectl delete); the run stops here" in outcome.message

    # The DELETED event alone says so too (a watch that missed the MODIFIED one).
    events = yaml.safe_load((FIXTURES / "k8s" / "cancelled.yaml").read_text())
    alone = StageTracker("demo-sft")
    alone.on_job(events[0]["object"])
    assert alone.outcome() is None
    gone = copy.deepcopy(events[0]["object"])
    alone.on_job(gone, deleted=True)
    assert alone.outcome().reason == "Deleted"


def test_a_gang_given_a_bad_input_fails_with_65_and_its_ended_pods_say_so():
    tracker, _ = replay("gang_bad_input")
    outcome = tracker.outcome()
    assert not outcome.retryable and outcome.exit_code == 65
    report = explain(tracker, outcome, events=[], logs={})
    assert "pod demo-sft-0-abcde: Failed, exit code 65" in report
    # the pod's phase lags: its container has ended, so it is not shown as running
    assert "pod demo-sft-1-fghij: Terminated, exit code 137" in report


def stopping_gang() -> tuple[dict, dict, dict, dict]:
    """The gang_bad_input recording's Job and pods: the pod whose input was bad as it
    ended (exit 65) and as it ran before that, and its peer, whose workers exited 1 (their
    peer's connection dropped)."""
    events = yaml.safe_load((FIXTURES / "k8s" / "gang_bad_input.yaml").read_text())
    job, bad_pod, other_pod = (copy.deepcopy(events[i]["object"]) for i in range(3))
    other_pod["status"]["containerStatuses"] = [
        {"name": "stage", "restartCount": 0, "state": {"terminated": {"exitCode": 1}}}
    ]
    running = copy.deepcopy(bad_pod)
    running["status"] = {"phase": "Running"}
    return job, bad_pod, running, other_pod


def test_a_gang_failed_by_a_lost_peer_waits_for_its_pods_exit_codes():
    """One pod's workers exit 1 (their peer's connection dropped) before the other pod's 65
    has reached the API: the Job's FailureTarget (BackoffLimitExceeded) does not decide, its
    Failed does, once every pod has ended and said its code."""
    job, bad_pod, running, other_pod = stopping_gang()
    tracker = StageTracker("demo-sft")
    tracker.on_job(job)
    tracker.on_pod(running)
    tracker.on_pod(other_pod)
    target = {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}
    job["status"]["conditions"] = [target]
    tracker.on_job(job)
    assert tracker.outcome() is None  # the first pod is still stopping
    tracker.on_pod(bad_pod)  # its 65 (the launcher keeps it through the SIGTERM)
    job["status"]["conditions"] = [target, {**target, "type": "Failed"}]
    tracker.on_job(job)
    outcome = tracker.outcome()
    assert not outcome.retryable and outcome.exit_code == 65, outcome
    # and a re-run does not follow the failing Job: it replaces it
    assert job_finished({"metadata": {}, "status": {"conditions": [target]}})


def gang_failed_before_its_65_was_read() -> tuple[StageTracker, dict, dict]:
    """A gang whose Job is Failed (BackoffLimitExceeded: a peer's exit 1, as Kubernetes
    before 1.31 fails it at once) while the pod whose input was bad is still stopping
    (the Job counts it as terminating): its exit 65 has not come yet."""
    job, bad_pod, running, other_pod = stopping_gang()
    tracker = StageTracker("demo-sft")
    tracker.on_pod(running)
    tracker.on_pod(other_pod)
    failed = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}
    job["status"] |= {"conditions": [failed], "active": 0, "terminating": 1}
    tracker.on_job(job)
    return tracker, bad_pod, job


def test_a_job_failed_before_its_pods_65_was_read_waits_for_it():
    tracker, bad_pod, _ = gang_failed_before_its_65_was_read()
    assert tracker.outcome(now=0.0) is None  # a pod still runs: its code may be a 65
    tracker.on_pod(bad_pod)
    outcome = tracker.outcome(now=1.0)
    assert not outcome.retryable and outcome.exit_code == 65, outcome


def test_a_65_said_only_by_the_deleted_pod_still_counts():
    tracker, bad_pod, _ = gang_failed_before_its_65_was_read()
    assert tracker.outcome(now=0.0) is None
    tracker.on_pod(bad_pod, deleted=True)  # the controller deleted it as the Job failed
    outcome = tracker.outcome(now=1.0)
    assert not outcome.retryable and outcome.exit_code == 65, outcome
    report = explain(tracker, outcome, events=[], logs={})
    assert "pod demo-sft-0-abcde (deleted): exit code 65" in report


def test_a_pod_that_never_says_its_code_delays_the_retry_only_so_long():
    tracker, _, _ = gang_failed_before_its_65_was_read()
    assert tracker.outcome(now=100.0) is None
    outcome = tracker.outcome(now=100.0 + tracker.settle_s)
    assert outcome.retryable and outcome.exit_code == 1, outcome


def test_pods_that_cannot_be_created_are_shown_and_end_the_wait():
    recorded = yaml.safe_load((FIXTURES / "k8s" / "failed_create.yaml").read_text())
    tracker = StageTracker("demo-sft")
    tracker.on_job(recorded["job"])
    seen: set[str] = set()
    shown = warnings_to_show(recorded["events"], seen)
    assert len(shown) == 2 and all("Warning FailedCreate" in line for line in shown)
    assert "violates PodSecurity" in shown[0] and "exceeded quota" in shown[1]
    assert warnings_to_show(recorded["events"], seen) == []  # each shown once

    assert stalled(tracker, 60, 900, shown) is None
    outcome = stalled(tracker, 901, 900, shown)
    assert not outcome.retryable and outcome.reason == "NoProgress"
    assert (
        "no pod of the Job ran in 901 s" in outcome.message and "exceeded quota" in outcome.message
    )


def test_the_stall_clock_runs_while_no_pod_runs_and_the_job_is_not_queued():
    def pod(name: str, phase: str) -> dict:
        return {"metadata": {"name": name}, "status": {"phase": phase}}

    tracker = StageTracker("demo-sft")
    tracker.on_job({"metadata": {"name": "demo-sft"}, "spec": {}, "status": {"active": 1}})
    tracker.on_pod(pod("demo-sft-0-a", "Running"))
    assert tracker.busy() and stalled(tracker, 10**6, 900, []) is None  # however long it runs
    # the node went; the replacement pod cannot be scheduled: the clock runs again
    tracker.on_pod(pod("demo-sft-0-a", "Failed"), deleted=True)
    tracker.on_pod(pod("demo-sft-0-b", "Pending"))
    assert not tracker.busy() and stalled(tracker, 899, 900, []) is None
    outcome = stalled(tracker, 901, 900, ["demo-sft-0-b: Warning FailedScheduling: 0/3 nodes"])
    assert outcome.reason == "NoProgress" and not outcome.retryable
    assert "no pod of the Job has been running for 901 s" in outcome.message
    assert "FailedScheduling" in outcome.message

    # a Job suspended in a queue (Kueue admits it when there is room) waits as long as it takes
    queued = StageTracker("demo-ppo")
    queued.on_job({"metadata": {"name": "demo-ppo"}, "spec": {"suspend": True}, "status": {}})
    assert queued.busy() and stalled(queued, 10**6, 900, []) is None


def test_a_job_deleted_while_no_watch_was_open_is_seen_deleted_in_the_fresh_list():
    """The watch expired (410 Gone) and `rlhf cancel` deleted the Job before the re-list:
    the fresh list no longer has it, which must end the wait as a DELETED event would."""
    job = {"metadata": {"name": "demo-sft"}, "spec": {}, "status": {"active": 1}}
    other = {"metadata": {"name": "demo-ppo"}, "spec": {}, "status": {}}
    known: dict[str, dict] = {}
    assert relisted(known, [job, other]) == [("ADDED", job), ("ADDED", other)]
    assert relisted(known, [other]) == [("DELETED", job), ("ADDED", other)]
    assert relisted(known, [other]) == [("ADDED", other)]  # told once
    # deleted and made again under its name between two watches: another object (its uid)
    known = {}
    first = {"metadata": {"name": "demo-sft", "uid": "u1"}, "spec": {}, "status": {}}
    second = {"metadata": {"name": "demo-sft", "uid": "u2"}, "spec": {}, "status": {}}
    relisted(known, [first])
    assert relisted(known, [second]) == [("DELETED", first), ("ADDED", second)]

    tracker = StageTracker("demo-sft")
    tracker.on_job(job)
    for event_type, obj in relisted({"demo-sft": job}, []):
        tracker.on_job(obj, deleted=event_type == "DELETED")
    assert tracker.outcome().reason == "Deleted" and tracker.outcome().exit_code == 130


def test_events_are_reported_in_the_order_they_happened():
    recorded = yaml.safe_load((FIXTURES / "k8s" / "failed_create.yaml").read_text())
    lines = event_lines(recorded["events"])
    # eventTime with microseconds (10:00:00.51) before lastTimestamp of seconds (10:00:01)
    assert [line.split(": ")[1] for line in lines] == [
        "Normal Created",
        "Warning FailedCreate",
        "Warning FailedCreate",
    ]
    assert "PodSecurity" in lines[1] and "quota" in lines[2]

    # a pod's life as the server timed it: eventTime to the microsecond for Scheduled,
    # lastTimestamp to the second for the kubelet's events; within a second, the life cycle
    def event(reason: str, **times: str) -> dict:
        return {"involvedObject": {"name": "p"}, "type": "Normal", "reason": reason, **times}

    pod_events = [
        event("Started", lastTimestamp="2026-01-01T10:00:05Z"),
        event("Created", lastTimestamp="2026-01-01T10:00:05Z"),
        event("Pulled", lastTimestamp="2026-01-01T10:00:05Z"),
        event("Scheduled", eventTime="2026-01-01T10:00:05.300000Z"),
        event("Killing", lastTimestamp="2026-01-01T10:00:09Z"),
        event("SuccessfulCreate", eventTime="2026-01-01T10:00:04.900000Z"),
    ]
    order = [line.split(": ")[1].split()[1] for line in event_lines(pod_events)]
    assert order == ["SuccessfulCreate", "Scheduled", "Pulled", "Created", "Started", "Killing"]


def test_a_second_run_follows_a_running_job_of_the_same_config_only():
    recorded = yaml.safe_load((FIXTURES / "k8s" / "failed_create.yaml").read_text())
    running = recorded["job"]
    rendered = copy.deepcopy(running)
    assert not job_finished(running) and same_config(running, rendered)

    changed = copy.deepcopy(running)
    changed["metadata"]["annotations"]["kuberlhf.io/config-sha256"] = "bbbb"
    assert not same_config(changed, rendered)
    # the same config on another image, GPU count or number of nodes is another Job too
    stage = {"name": "stage", "image": "kuberlhf:0.1.0", "resources": {"limits": {}}}
    rendered["spec"]["template"] = {"spec": {"containers": [stage]}}
    rendered["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = {
        "nvidia.com/gpu": "1"
    }
    existing = copy.deepcopy(rendered)
    assert same_config(existing, rendered)
    for path, value in (("image", "kuberlhf:0.2.0"), ("gpus", "2"), ("parallelism", 2)):
        other = copy.deepcopy(existing)
        container = other["spec"]["template"]["spec"]["containers"][0]
        if path == "image":
            container["image"] = value
        elif path == "gpus":
            container["resources"]["limits"]["nvidia.com/gpu"] = value
        else:
            other["spec"]["parallelism"] = other["spec"]["completions"] = value
        assert not same_config(other, rendered), path

    tracker, _ = replay("bad_input")  # finished and failed: replaced, not followed
    assert job_finished(tracker.job)
    cancelled, _ = replay("cancelled")
    assert job_finished(cancelled.job)


def test_a_job_made_again_under_its_name_shows_only_its_own_events():
    recorded = yaml.safe_load((FIXTURES / "k8s" / "failed_create.yaml").read_text())
    old, new = copy.deepcopy(recorded["events"][:2])
    old["involvedObject"]["uid"], new["involvedObject"]["uid"] = "uid-before", "uid-now"
    assert own_events([old, new], "uid-now") == [new]
    assert own_events([old, new], "") == [old, new]  # not known yet: nothing to tell apart


def test_an_image_pull_or_a_node_being_added_restarts_the_stall_clock():
    pulling = {"type": "Normal", "reason": "Pulling", "metadata": {"uid": "e1"}, "count": 1}
    scale_up = {"type": "Normal", "reason": "TriggeredScaleUp", "metadata": {"uid": "e2"}}
    refused = {"type": "Warning", "reason": "FailedCreate", "metadata": {"uid": "e3"}}
    seen: set[str] = set()
    assert not under_way([refused], seen)
    assert under_way([refused, pulling], seen)
    assert not under_way([pulling], seen)  # the same event again is no news
    assert under_way([pulling, scale_up], seen)
    # pulled again (a back-off: a wrong tag) is no progress: the stall ends it as before
    assert not under_way([{**pulling, "count": 2}], seen)
