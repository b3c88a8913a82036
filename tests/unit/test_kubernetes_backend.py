"""The Kubernetes backend's wiring (create, follow, re-create, give up, re-attach), driven
through the real kubernetes client against an API server that replays the recorded
sequences of ``tests/fixtures/k8s`` (``tests/recorded_api.py``): what a cluster showed
stays fixed without one."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import yaml

from jobs import store
from jobs.contract import PROGRESS, STATUS
from pipeline.backends import StageFailed
from pipeline.charts import render_stage
from pipeline.config import plan
from pipeline.watch import BAD_INPUT, EXIT_CANCELLED
from tests.conftest import FIXTURES, pipeline_file
from tests.recorded_api import RecordedCluster, as_created, kubeconfig, serve


def recorded(name: str) -> list[dict]:
    return yaml.safe_load((FIXTURES / "k8s" / f"{name}.yaml").read_text())


def sft_plan(folder, stall_timeout_s: float = 120, **spec):
    """A one-stage run whose Job is the recordings' demo-sft in namespace ml (``spec``:
    the stage's own settings beside its config)."""
    stage = {"config": {"model": "s3://b/m", "data": "s3://b/d"}, **spec}
    path = pipeline_file(
        folder, {"sft": stage}, kubernetes={"namespace": "ml", "stall_timeout_s": stall_timeout_s}
    )
    the_plan = plan(str(path))
    [planned] = the_plan.stages
    return the_plan, planned


@pytest.fixture
def stage_plan(tmp_path):
    # a stall timeout long enough that a loaded CI machine never hits it where a test does
    # not mean to
    return sft_plan(tmp_path)


@pytest.fixture
def connect(tmp_path, monkeypatch):
    """A backend talking to a RecordedCluster over HTTP, and the lines it printed."""
    from kubernetes.config import kube_config

    from pipeline.backends.kubernetes import KubernetesBackend

    servers = []

    def make(cluster: RecordedCluster):
        server, url = serve(cluster)
        servers.append(server)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        path = kubeconfig(url, tmp_path / "kubeconfig")
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
        lines: list[str] = []
        return KubernetesBackend(echo=lines.append, poll_s=0.1), lines

    make.servers = servers
    yield make
    for server in servers:
        server.shutdown()


def running_status(output: str) -> None:
    """The stage's status as its pod last pushed it: running, step 3 of 10."""
    status = {
        "state": "running",
        "step": 3,
        "total": 10,
        "started": 1.0,
        "time": 31.0,
        "first": [1, 11.0],
        "metrics": {"loss": 2.5},
    }
    store.write_text(store.join(output, PROGRESS, STATUS), json.dumps(status))


def test_a_gang_given_a_bad_input_is_created_once_and_given_up(stage_plan, connect):
    """Exit 65 from a rank (torchrun passes it on) ends the stage: one Job, no retry, the
    reason printed, the stage's status and the Job's annotation say failed."""
    the_plan, stage = stage_plan
    running_status(stage.output)
    cluster = RecordedCluster([recorded("gang_bad_input")])
    backend, lines = connect(cluster)

    with pytest.raises(StageFailed) as failed:
        backend.run_stage(the_plan, stage, "[1/1] sft")

    assert failed.value.exit_code == 65
    assert BAD_INPUT in str(failed.value)
    assert cluster.created == ["configmaps", "jobs"]
    assert not any("re-creating" in line for line in lines)
    assert not any(m == "DELETE" for m, _ in cluster.requests)  # kept to be looked at
    status = json.loads(store.read_text(store.join(stage.output, PROGRESS, STATUS)))
    assert status["state"] == "failed" and "PodFailurePolicy" in status["error"]
    # the Job's annotation followed: step 3 while it ran, then the failed state
    assert "step 3/10" in cluster.annotations[0]
    assert cluster.annotations[-1].startswith("failed at step 3/10")


def test_a_lost_rank_re_creates_the_job_and_the_run_goes_on(stage_plan, connect):
    the_plan, stage = stage_plan
    cluster = RecordedCluster([recorded("gang_rank_lost"), recorded("success")])
    backend, lines = connect(cluster)

    backend.run_stage(the_plan, stage, "[1/1] sft")

    # the finished stage's ConfigMap goes (nothing owns it: the Job's TTL would leave it)
    assert ("DELETE", "/api/v1/namespaces/ml/configmaps/demo-sft-config") in cluster.requests

    assert cluster.created.count("jobs") == 2  # the server refuses a name still taken (409)
    assert any("re-creating the Job (1/2)" in line for line in lines)
    # the failed Job was deleted before its successor was created
    events = [(kind, event_type) for _, kind, event_type, _ in cluster.log]
    gone = events.index(("Job", "DELETED"))
    assert events[gone + 1 :].count(("Job", "ADDED")) == 1


@pytest.mark.parametrize(
    "nodes, evicted, spared",
    [(2, False, True), (1, False, False), (2, True, False)],
    ids=["gang-preempted", "single-pod", "gang-evicted-for-memory"],
)
def test_a_gang_failed_by_a_preempted_pod_is_re_created_without_spending_its_retries(
    stage_plan, connect, nodes, evicted, spared
):
    """One pod of a gang preempted (DisruptionTarget): the podFailurePolicy ignores that
    pod, but its peers exit and the gang's Job fails. Three such failures, with the
    stage's 2 retries, end in success: a disruption is no fault of the stage (they used up
    the retries, and a spot-instance gang gave up at its third preemption). A single pod's
    Job fails for other reasons (its disruptions the policy absorbs), and a gang whose pod
    the kubelet evicted for memory outgrew its node: those count."""
    import dataclasses

    the_plan, stage = stage_plan
    spec = stage.spec.model_copy(update={"nnodes": nodes})
    stage = dataclasses.replace(stage, spec=spec)
    disrupted = recorded("gang_rank_lost")
    for event in disrupted:
        obj = event["object"]
        if obj["kind"] == "Pod" and obj["status"].get("phase") == "Failed":
            reason = "TerminationByKubelet" if evicted else "PreemptionByScheduler"
            obj["status"]["conditions"] = [
                *obj["status"].get("conditions", []),
                {"type": "DisruptionTarget", "status": "True", "reason": reason},
            ]
            if evicted:
                obj["status"]["reason"] = "Evicted"
    cluster = RecordedCluster([disrupted] * 3 + [recorded("success")])
    backend, lines = connect(cluster)

    if spared:
        backend.run_stage(the_plan, stage, "[1/1] sft")
        assert cluster.created.count("jobs") == 4
    else:
        with pytest.raises(StageFailed):
            backend.run_stage(the_plan, stage, "[1/1] sft")
        assert cluster.created.count("jobs") == 3  # the first and its 2 retries
    taken = [line for line in lines if "a pod was disrupted, not counted" in line]
    assert len(taken) == (3 if spared else 0), lines


def test_rlhf_cancel_ends_the_wait_at_once_without_a_retry(stage_plan, connect):
    the_plan, stage = stage_plan
    cluster = RecordedCluster([recorded("cancelled")])
    backend, lines = connect(cluster)

    with pytest.raises(StageFailed) as failed:
        backend.run_stage(the_plan, stage, "[1/1] sft")

    assert failed.value.exit_code == EXIT_CANCELLED
    assert "was deleted" in str(failed.value)
    assert cluster.created.count("jobs") == 1


def test_a_cancelled_run_creates_no_more_jobs(stage_plan, connect):
    """`rlhf cancel` marks the run before it deletes the Jobs: a submitter that was between
    two stages, or replacing a Job, when the cancel listed them creates none after it."""
    from pipeline.backends import mark_cancelled

    the_plan, stage = stage_plan
    cluster = RecordedCluster([recorded("success")])
    backend, _ = connect(cluster)
    mark_cancelled(the_plan)

    with pytest.raises(StageFailed) as failed:
        backend.run_stage(the_plan, stage, "[1/1] sft")

    assert failed.value.exit_code == EXIT_CANCELLED and "cancelled" in str(failed.value)
    assert "jobs" not in cluster.created


def test_a_second_run_follows_the_running_job_of_the_same_config(stage_plan, connect):
    the_plan, stage = stage_plan
    [job] = [m for m in render_stage(the_plan, stage) if m["kind"] == "Job"]
    cluster = RecordedCluster([], running=as_created(recorded("success"), job))
    backend, lines = connect(cluster)

    backend.run_stage(the_plan, stage, "[1/1] sft")

    assert cluster.created == []  # nothing re-created, nothing deleted
    assert not any(m == "DELETE" and "/jobs/" in path for m, path in cluster.requests)
    assert any("Job demo-sft is running; following it" in line for line in lines)


def test_a_job_that_completed_and_went_unseen_is_a_success_not_a_cancel(
    stage_plan, connect, tmp_path
):
    """The Job completed and its ttlSecondsAfterFinished removed it while no watch was
    open: the list shows it gone. Its stage published its output and nobody cancelled the
    run, so the stage succeeded (it was reported as cancelled, exit 130)."""
    from jobs.contract import run_stage

    the_plan, stage = stage_plan
    [job] = [m for m in render_stage(the_plan, stage) if m["kind"] == "Job"]
    events = as_created(recorded("success"), job)[:-1]  # not seen Complete
    pod, job_object = events[-1]["object"], events[-2]["object"]
    events += [
        {"type": "DELETED", "object": copy.deepcopy(pod)},
        {"type": "DELETED", "object": copy.deepcopy(job_object)},
    ]
    # what the stage's pod wrote before its Job went
    run_stage(stage.stage, stage.config, lambda config, ctx: {"steps": 1}, tmp_path / "work")
    cluster = RecordedCluster([], running=events, step_s=0.2)  # the watch sees it go
    backend, lines = connect(cluster)

    backend.run_stage(the_plan, stage, "[1/1] sft")  # no StageFailed

    assert cluster.created == []


def test_a_job_that_went_before_the_watch_listed_it_is_a_success_when_published(connect, tmp_path):
    """Followed (running when read), then removed by its TTL before the watch's first
    list: nothing of it is ever seen, and the wait ends as a stall. Its stage published
    its output, so the stage succeeded (it was given up, and marked failed)."""
    from jobs.contract import run_stage

    the_plan, stage = sft_plan(tmp_path, stall_timeout_s=1)
    [job] = [m for m in render_stage(the_plan, stage) if m["kind"] == "Job"]
    events = as_created(recorded("success"), job)[:4]  # its pod running
    run_stage(stage.stage, stage.config, lambda config, ctx: {"steps": 1}, tmp_path / "work")
    cluster = RecordedCluster([], running=events, step_s=0.0)
    backend, lines = connect(cluster)

    def echo(line: str) -> None:
        lines.append(line)
        if "following it" in line:  # between the read and the watch's list: it goes
            with cluster.lock:
                for kind in ("Pod", "Job"):
                    for obj in list(cluster.objects[kind].values()):
                        cluster._emit(kind, "DELETED", obj)

    backend.echo = echo
    backend.run_stage(the_plan, stage, "[1/1] sft")  # no StageFailed

    assert cluster.created == [] and any("following it" in line for line in lines)


def test_a_second_run_with_another_config_replaces_the_job(stage_plan, connect):
    the_plan, stage = stage_plan
    [job] = [m for m in render_stage(the_plan, stage) if m["kind"] == "Job"]
    other = copy.deepcopy(job)
    other["metadata"]["annotations"]["kuberlhf.io/config-sha256"] = "0" * 64
    cluster = RecordedCluster([recorded("success")], running=as_created(recorded("success"), other))
    backend, lines = connect(cluster)

    backend.run_stage(the_plan, stage, "[1/1] sft")

    assert cluster.created.count("jobs") == 1
    assert ("DELETE", "/apis/batch/v1/namespaces/ml/jobs/demo-sft") in cluster.requests
    assert not any("following it" in line for line in lines)


def test_a_retry_follows_the_job_another_run_of_the_file_made_first(stage_plan, connect):
    """Two `rlhf run` of one run follow one Job; it fails (a lost rank) and the other
    submitter makes its successor first: this one follows that Job too, rather than
    deleting a gang that has just started (it followed a running Job only on its first
    attempt)."""
    the_plan, stage = stage_plan
    [job] = [m for m in render_stage(the_plan, stage) if m["kind"] == "Job"]
    first = as_created(recorded("gang_rank_lost"), job)
    successor = as_created(recorded("success"), job)
    for event in successor:
        if event["object"]["kind"] == "Job":
            event["object"]["metadata"]["uid"] = "uid-the-other-submitters"
    # slow enough that the successor is still running when the retry looks
    cluster = RecordedCluster([recorded("success")], running=first, step_s=0.2)
    backend, lines = connect(cluster)

    def echo(line: str) -> None:
        lines.append(line)
        if "re-creating the Job" in line:  # the other submitter is quicker
            with cluster.lock:
                for kind in ("Pod", "Job"):
                    for obj in list(cluster.objects[kind].values()):
                        cluster._emit(kind, "DELETED", obj)
                cluster._start(successor)

    backend.echo = echo
    backend.run_stage(the_plan, stage, "[1/1] sft")

    assert not any(m == "DELETE" and "/jobs/" in path for m, path in cluster.requests), (
        cluster.requests
    )
    assert cluster.created == []
    assert sum("Job demo-sft is running; following it" in line for line in lines) == 2


def test_a_job_of_another_run_under_the_same_name_is_left_alone(stage_plan, connect):
    """Run "demo" stage "sft" and run "de" stage "mo-sft" both name their Job demo-sft:
    the other run's Job, running in a shared namespace, is refused, not deleted."""
    the_plan, stage = stage_plan
    [job] = [m for m in render_stage(the_plan, stage) if m["kind"] == "Job"]
    other = copy.deepcopy(job)
    other["metadata"]["labels"] |= {"kuberlhf.io/run": "de", "kuberlhf.io/stage": "mo-sft"}
    other["metadata"]["annotations"]["kuberlhf.io/config-sha256"] = "0" * 64
    cluster = RecordedCluster([recorded("success")], running=as_created(recorded("success"), other))
    backend, _ = connect(cluster)

    with pytest.raises(StageFailed, match="not this stage's .*run 'de', stage 'mo-sft'") as failed:
        backend.run_stage(the_plan, stage, "[1/1] sft")
    assert failed.value.exit_code == 65
    assert not any(m == "DELETE" and "/jobs/" in path for m, path in cluster.requests)
    assert cluster.created == []


def test_a_job_another_submitter_keeps_creating_is_a_clear_retryable_error(stage_plan, connect):
    """The Job's name is taken again right after this run cleared it (two `rlhf run` of one
    run racing): a clear error to run again, not following a Job of unknown config."""
    from jobs.errors import EXIT_RETRY, TransientError

    the_plan, stage = stage_plan
    cluster = RecordedCluster([recorded("success")], contested=True)
    backend, _ = connect(cluster)

    with pytest.raises(TransientError, match="was created by someone else") as failed:
        backend.run_stage(the_plan, stage, "[1/1] sft")
    assert failed.value.exit_code == EXIT_RETRY
    assert "jobs" not in cluster.created


def test_pods_that_cannot_be_created_are_printed_and_end_the_run(stage_plan, connect):
    """A namespace that refuses the pods: their FailedCreate events are printed while the
    backend waits, and the stage fails after the stall timeout (1 s here), not retried."""
    the_plan, stage = stage_plan
    the_plan.kubernetes.stall_timeout_s = 1
    failed_create = yaml.safe_load((FIXTURES / "k8s" / "failed_create.yaml").read_text())
    cluster = RecordedCluster(
        [[{"type": "ADDED", "object": failed_create["job"]}]], warnings=failed_create["events"]
    )
    backend, lines = connect(cluster)

    with pytest.raises(StageFailed) as failed:
        backend.run_stage(the_plan, stage, "[1/1] sft")

    assert "no pod of the Job ran" in str(failed.value)
    assert cluster.created.count("jobs") == 1
    # not left queued, to start unattended once the namespace lets it
    assert "the Job demo-sft was deleted" in str(failed.value)
    assert "demo-sft" not in cluster.objects["Job"]
    shown = [line for line in lines if "Warning FailedCreate" in line]
    assert len(shown) == 2 and "violates PodSecurity" in shown[0]


@pytest.mark.parametrize("outage", ["connection refused", "503"])
def test_the_wait_survives_an_api_server_restart(stage_plan, connect, outage):
    """The API server goes away for a second while the stage runs (a control-plane
    restart: nothing listens, or it answers 503 while it starts): the watch lists again
    when it is back, and the run ends as the Job does."""
    the_plan, stage = stage_plan
    # the events after the Job's first pod wait for the outage to end: the Job can only be
    # seen to finish by a backend that came back
    cluster = RecordedCluster([recorded("success")], hold_at=2)
    backend, _ = connect(cluster)
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            backend.run_stage(the_plan, stage, "[1/1] sft")
            ended.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            ended.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while cluster.version() < 2:  # the Job and its first pod are out
        assert thread.is_alive() and time.monotonic() < deadline, ended
        time.sleep(0.05)
    lists = cluster.lists
    if outage == "503":
        cluster.unavailable_until = time.monotonic() + 1.0
        cluster.end_watches()
        time.sleep(1.0)
    else:
        [server] = connect.servers
        port = server.server_address[1]
        server.shutdown()
        server.server_close()
        cluster.end_watches()
        time.sleep(1.0)
        connect.servers[0] = serve(cluster, port=port)[0]
    cluster.let_go()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the wait did not survive the API server's restart"
    assert ended == [None]
    assert cluster.lists > lists  # the watch met the outage and started over


def test_a_watch_stream_that_dies_of_any_error_ends_the_wait_with_it():
    """A stream thread that died silently (an error in decoding an object, say) would leave
    the wait on stale state for ever: whatever ends it reaches the wait as an error."""
    import queue
    import threading
    from types import SimpleNamespace

    from pipeline.backends.kubernetes import KubernetesBackend

    def list_namespaced_job(namespace, label_selector):
        raise ValueError("Invalid value for `conditions`, must not be `None`")

    out: queue.Queue = queue.Queue()
    backend = SimpleNamespace(api=None, poll_s=0.1)
    KubernetesBackend._stream(backend, list_namespaced_job, "ml", "a=b", out, threading.Event())
    kind, event_type, error = out.get(timeout=1)
    assert (kind, event_type) == ("Job", "ERROR") and isinstance(error, ValueError)


def test_two_stages_of_one_kind_get_two_jobs_that_the_backend_follows():
    """The demo has three reward stages (reward-v1, reward and the judge): each its own
    Job and ConfigMap, labelled with its name in the pipeline, which the backend selects
    its Job and pods by."""
    from pipeline.backends.kubernetes import run_selector
    from tests.recorded_api import selected

    the_plan = plan("examples/demo.yaml")
    names = {}
    for stage in the_plan.stages:
        for manifest in render_stage(the_plan, stage):
            names.setdefault((manifest["kind"], manifest["metadata"]["name"]), []).append(
                stage.name
            )
            if manifest["kind"] != "Job":
                continue
            namespace = the_plan.kubernetes.namespace
            job = {**manifest, "metadata": {**manifest["metadata"], "namespace": namespace}}
            assert selected(job, namespace, run_selector(the_plan.run_id, stage.name)), stage
            pod = {"metadata": {**manifest["spec"]["template"]["metadata"], "namespace": namespace}}
            selector = run_selector(the_plan.run_id, stage.name, pods=True)
            assert selected(pod, namespace, selector), stage
    kinds = [stage.stage for stage in the_plan.stages]
    assert kinds.count("reward") == 3
    shared = {key: stages for key, stages in names.items() if len(stages) > 1}
    assert not shared, shared


def test_an_api_server_that_goes_silent_ends_the_call_instead_of_holding_it(tmp_path, monkeypatch):
    """A connection the API server leaves open without answering (a node powered off, a
    load balancer dropping packets): the client's default is to wait for ever, and the
    run's watch with it. Every call has a read timeout; the watch's outlives the server's
    own end of a watch."""
    import socket

    from kubernetes.config import kube_config
    from urllib3.exceptions import HTTPError

    from pipeline.backends import kubernetes as backend_module
    from tests.recorded_api import kubeconfig

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = kubeconfig(url, tmp_path / "kubeconfig")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    assert backend_module.REQUEST_TIMEOUT[1] > backend_module.WATCH_S
    monkeypatch.setattr(backend_module, "REQUEST_TIMEOUT", (2.0, 2.0))
    backend = backend_module.KubernetesBackend(echo=print, poll_s=0.1)
    raised = []

    def ask() -> None:
        try:
            backend.running_job("ml", "demo-sft")
        except HTTPError as exc:
            raised.append(exc)

    caller = threading.Thread(target=ask, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "the call is still waiting on a silent API server"
    assert raised and "timed out" in str(raised[0]).lower(), raised
    listener.close()


@pytest.mark.parametrize("answer", ["forbidden", "configmaps-forbidden", "unreachable"])
def test_an_api_server_that_refuses_or_cannot_be_reached_is_a_clear_error(
    stage_plan, tmp_path, monkeypatch, capsys, answer
):
    """`rlhf cancel` with a Role that may not list Jobs (403), or Jobs but not the ConfigMaps
    every run makes (only Services and NetworkPolicies, which a run of one-pod stages makes
    none of, may be unlistable), or a kubeconfig pointing at nothing: one line saying what
    the API server said, exit 65 or 75, not the client's traceback (and the cancel mark
    stays: a running submitter still stops)."""
    import socket
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kubernetes.config import kube_config

    from pipeline.cli import main
    from tests.recorded_api import kubeconfig

    class Forbidden(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            if answer == "configmaps-forbidden" and "/jobs" in self.path:
                listed = {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []}
                body = json.dumps(listed).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            body = json.dumps(
                {
                    "kind": "Status",
                    "status": "Failure",
                    "message": 'jobs.batch is forbidden: User "ci" cannot list resource "jobs"',
                    "reason": "Forbidden",
                    "code": 403,
                }
            ).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    if answer != "unreachable":
        server = ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
    else:
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    path = kubeconfig(url, tmp_path / "kubeconfig")
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    the_plan, _ = stage_plan
    code = main(["cancel", the_plan.source, "--backend", "kubernetes"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: kubernetes: "), err
    if answer != "unreachable":
        assert code == 65 and "403 Forbidden in namespace ml" in err and "cannot list" in err
        server.shutdown()
    else:
        assert code == 75 and "could not be reached" in err


@pytest.mark.parametrize("gpus, processes", [(8, 1), (1, 2)])
def test_a_pods_gpus_and_processes_must_match_on_a_cluster(tmp_path, connect, gpus, processes):
    """Each process takes its local rank's GPU: 8 GPUs for one process left 7 idle, two
    processes on one GPU failed at their first CUDA call. Refused before anything is made
    (on one machine the chart's GPU count means nothing: the local backend runs it)."""
    from jobs.errors import BadInputError
    from pipeline.backends.kubernetes import gpus_and_processes

    the_plan, stage = sft_plan(tmp_path / "a", nproc_per_node=processes, values={"gpus": gpus})
    cluster = RecordedCluster([])
    backend, _ = connect(cluster)
    with pytest.raises(BadInputError, match="each process trains on one GPU of its own"):
        backend.run_stage(the_plan, stage, "[1/1] sft")
    assert cluster.created == [] and cluster.requests == []
    # the control: one process per GPU
    matched, stage = sft_plan(tmp_path / "b", nproc_per_node=gpus, values={"gpus": gpus})
    [job] = [m for m in render_stage(matched, stage) if m["kind"] == "Job"]
    assert gpus_and_processes(job) is None
