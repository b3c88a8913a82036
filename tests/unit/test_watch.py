"""Progress and failure explanations from recorded sequences of Job and Pod objects: the only
place where Kubernetes responses are stood in for."""

from __future__ import annotations

import yaml

from pipeline.watch import StageTracker, explain
from tests.conftest import FIXTURES


def replay(name: str) -> tuple[StageTracker, list[str]]:
    tracker, progress = StageTracker("demo-sft"), []
    for event in yaml.safe_load((FIXTURES / "k8s" / f"{name}.yaml").read_text()):
        obj = event["object"]
        if obj["kind"] == "Job":
            tracker.on_job(obj)
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
    assert "exit code 65: bad config or input, not retried" in report
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
