"""A Kubernetes API server that replays recorded sequences, for the backend's own tests.

The Kubernetes backend talks to it through the real ``kubernetes`` client over HTTP (its
request models, its watch, its deserialisation), so what is tested is the backend's wiring
(create, follow, re-create, give up, re-attach) on the recorded Job and Pod sequences of
``tests/fixtures/k8s`` without a cluster; ``tests/e2e`` runs the same paths on a real one.

Each Job the backend creates starts the next recorded sequence; its events are released
one by one (``step_s`` apart) to lists and watches, as a cluster would make them. Only the
calls the backend makes are answered: Jobs, Pods, ConfigMaps, Services, NetworkPolicies,
Events and pod logs. As an API server does, lists and watches keep to their namespace and
equality label selector, a Job whose name is taken is refused (409), and while
``unavailable_until`` has not passed every request gets 503 (a control plane starting up).
An outage can be staged without races: ``hold_at`` keeps the events after a version back
until ``let_go()``, and ``end_watches()`` drops the open watches.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

PATH = re.compile(
    r"^/(?:api/v1|apis/batch/v1|apis/networking\.k8s\.io/v1)/namespaces/(?P<ns>[^/]+)/"
    r"(?P<kind>jobs|pods|configmaps|services|networkpolicies|events)"
    r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$"
)
KINDS = {"jobs": "Job", "pods": "Pod"}


class RecordedCluster:
    """The state the backend sees: objects built from released events, what it asked."""

    def __init__(
        self,
        sequences: list[list[dict[str, Any]]],
        running: list[dict[str, Any]] | None = None,
        warnings: list[dict[str, Any]] | None = None,
        step_s: float = 0.05,
        hold_at: int | None = None,
        contested: bool = False,
    ) -> None:
        self.sequences = [copy.deepcopy(s) for s in sequences]
        self.step_s = step_s
        self.warnings = warnings or []
        self.requests: list[tuple[str, str]] = []  # (method, path without the query)
        self.created: list[str] = []  # kinds, in order
        self.annotations: list[str] = []
        self.lock = threading.Condition()
        # (resourceVersion, kind, type, object) released so far, and those still to come
        self.log: list[tuple[int, str, str, dict]] = []
        self.pending: list[tuple[float, str, str, dict]] = []
        self.objects: dict[str, dict[str, dict]] = {"Job": {}, "Pod": {}}
        # a Job already running when the backend comes: it starts at the first request
        self.running = copy.deepcopy(running)
        self.unavailable_until = 0.0  # time.monotonic() until which every request gets 503
        # no event past this resourceVersion is released until ``let_go()`` (an outage's
        # events wait for it); ``end_watches()`` closes the watches open now
        self.hold_at = hold_at
        self.watch_epoch = 0
        # another submitter creates the Job whenever this one has cleared it: 409 always
        self.contested = contested
        self.lists = 0  # lists of Jobs or Pods answered (a watch that starts over lists again)

    # --- the recorded world ---------------------------------------------------------------

    def _start(self, sequence: list[dict[str, Any]]) -> None:
        at = time.monotonic()
        for number, event in enumerate(sequence):
            obj = event["object"]
            self.pending.append((at + number * self.step_s, obj["kind"], event["type"], obj))

    def _release(self) -> None:
        if self.running is not None:
            self._start(self.running)
            self.running = None
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            if self.hold_at is not None and len(self.log) >= self.hold_at:
                return
            _, kind, event_type, obj = self.pending.pop(0)
            self._emit(kind, event_type, obj)

    def _emit(self, kind: str, event_type: str, obj: dict) -> None:
        obj = copy.deepcopy(obj)
        version = len(self.log) + 1
        obj["metadata"]["resourceVersion"] = str(version)
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
        if event_type == "DELETED":
            self.objects[kind].pop(obj["metadata"]["name"], None)
        else:
            self.objects[kind][obj["metadata"]["name"]] = obj
        self.log.append((version, kind, event_type, obj))
        self.lock.notify_all()

    def version(self) -> int:
        return len(self.log)

    def end_watches(self) -> None:
        """Close every watch open now, as a restarting API server drops its connections."""
        with self.lock:
            self.watch_epoch += 1
            self.lock.notify_all()

    def let_go(self) -> None:
        """Release the held events again (their times have passed: they come at once)."""
        with self.lock:
            self.hold_at = None
            self.lock.notify_all()

    # --- the API's verbs --------------------------------------------------------------------

    def create(self, kind: str, body: dict) -> dict | None:
        """The object made, or None where a Job of that name still exists (409)."""
        if kind == "jobs" and (self.contested or body["metadata"]["name"] in self.objects["Job"]):
            return None
        self.created.append(kind)
        if kind == "jobs":
            if not self.sequences:
                raise AssertionError("the backend created more Jobs than were recorded")
            self._start(as_created(self.sequences.pop(0), body))
        return body

    def delete_job(self, name: str) -> bool:
        job = self.objects["Job"].get(name)
        if job is None:
            return False
        # foreground propagation: the pods go, then the Job; its recorded future with it
        self.pending = []
        for pod in list(self.objects["Pod"].values()):
            self._emit("Pod", "DELETED", pod)
        self._emit("Job", "DELETED", job)
        return True

    def events_of(self, name: str) -> list[dict]:
        return [e for e in self.warnings if e["involvedObject"]["name"] == name]


def as_created(sequence: list[dict[str, Any]], job: dict[str, Any]) -> list[dict[str, Any]]:
    """A recorded sequence of a Job made from ``job``: the server keeps the spec, labels and
    annotations it was given, and the pods get the template's labels (the recordings hold
    only the fields that change)."""
    out = copy.deepcopy(sequence)
    for event in out:
        obj = event["object"]
        if obj["kind"] == "Job":
            annotations = job["metadata"].get("annotations") or {}
            obj["metadata"]["annotations"] = copy.deepcopy(annotations)
            obj["metadata"]["labels"] = {
                **(obj["metadata"].get("labels") or {}),
                **(job["metadata"].get("labels") or {}),
            }
            obj["spec"] = {**copy.deepcopy(job["spec"]), **obj.get("spec", {})}
        else:
            template = job["spec"]["template"]["metadata"].get("labels") or {}
            obj["metadata"]["labels"] = {**(obj["metadata"].get("labels") or {}), **template}
    return out


def selected(obj: dict, namespace: str, selector: str) -> bool:
    """Whether a list or watch in ``namespace`` with an equality ``selector`` sees ``obj``."""
    metadata = obj["metadata"]
    if metadata.get("namespace", namespace) != namespace:
        return False
    labels = metadata.get("labels") or {}
    terms = [term.split("=", 1) for term in selector.split(",") if term]
    return all(labels.get(key) == value for key, value in terms)


def _object_list(kind: str, items: list[dict], version: int) -> dict:
    return {
        "apiVersion": "batch/v1" if kind == "Job" else "v1",
        "kind": f"{kind}List",
        "metadata": {"resourceVersion": str(version)},
        "items": items,
    }


def serve(cluster: RecordedCluster, port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start the server in a thread (on ``port``, or any free one); returns it and its URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # a watch's body ends when the connection closes

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _not_found(self, name: str) -> None:
            self._reply(
                404,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "message": f"{name} not found",
                    "code": 404,
                },
            )

        def _route(self):
            url = urlparse(self.path)
            match = PATH.match(url.path)
            with cluster.lock:
                cluster.requests.append((self.command, url.path))
            if match is None:
                raise AssertionError(f"the backend called an unrecorded path: {self.path}")
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            self.namespace = match["ns"]
            return match["kind"], match["name"], match["sub"], query

        def _unavailable(self) -> bool:
            """Answer 503 while the recorded control plane is starting up."""
            if time.monotonic() >= cluster.unavailable_until:
                return False
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
            self._reply(503, {**status, "reason": "ServiceUnavailable", "code": 503})
            return True

        def do_GET(self):  # noqa: N802 - the http.server API
            kind, name, sub, query = self._route()
            if self._unavailable():
                return
            if kind == "events":
                wanted = query.get("fieldSelector", "").removeprefix("involvedObject.name=")
                with cluster.lock:
                    items = cluster.events_of(wanted)
                self._reply(
                    200, {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items}
                )
                return
            if sub == "log":
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"error: recorded run\n")
                return
            what = KINDS[kind]
            with cluster.lock:
                cluster._release()
                if name is not None:
                    found = cluster.objects[what].get(name)
                    found = copy.deepcopy(found) if found is not None else None
                elif query.get("watch") != "true":
                    items = [
                        copy.deepcopy(obj)
                        for obj in cluster.objects[what].values()
                        if selected(obj, self.namespace, query.get("labelSelector", ""))
                    ]
                    listed = _object_list(what, items, cluster.version())
                    cluster.lists += 1
            if name is not None:
                return self._reply(200, found) if found is not None else self._not_found(name)
            if query.get("watch") != "true":
                return self._reply(200, listed)
            since = int(query.get("resourceVersion") or 0)
            self._watch(what, since, query.get("labelSelector", ""))

        def _watch(self, kind: str, since: int, selector: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            # a short watch: the client opens the next one from the last version it saw
            until = time.monotonic() + 1.0
            epoch = cluster.watch_epoch
            while time.monotonic() < until and cluster.watch_epoch == epoch:
                with cluster.lock:
                    cluster._release()
                    fresh = [e for e in cluster.log if e[0] > since]
                    if not fresh:
                        cluster.lock.wait(timeout=0.02)
                        continue
                since = fresh[-1][0]
                for _, what, event_type, obj in fresh:
                    if what != kind or not selected(obj, self.namespace, selector):
                        continue
                    line = json.dumps({"type": event_type, "object": obj}) + "\n"
                    try:
                        self.wfile.write(line.encode())
                        self.wfile.flush()
                    except OSError:  # the backend stopped watching
                        return

        def do_POST(self):  # noqa: N802
            kind, _, _, _ = self._route()
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self._unavailable():
                return
            with cluster.lock:
                made = cluster.create(kind, body)
            if made is None:
                status = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
                message = f'jobs.batch "{body["metadata"]["name"]}" already exists'
                return self._reply(
                    409, {**status, "reason": "AlreadyExists", "message": message, "code": 409}
                )
            self._reply(201, body)

        def do_DELETE(self):  # noqa: N802
            kind, name, _, _ = self._route()
            if self._unavailable():
                return
            with cluster.lock:
                cluster._release()
                gone = cluster.delete_job(name) if kind == "jobs" else True
            if not gone:
                return self._not_found(name)
            if kind == "services":  # the API answers a Service's delete with the Service
                return self._reply(
                    200, {"kind": "Service", "apiVersion": "v1", "metadata": {"name": name}}
                )
            self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        def do_PATCH(self):  # noqa: N802
            kind, name, _, _ = self._route()
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self._unavailable():
                return
            with cluster.lock:
                job = copy.deepcopy(cluster.objects["Job"].get(name))
                cluster.annotations.append(body["metadata"]["annotations"]["kuberlhf.io/progress"])
            if job is None:
                return self._not_found(name)
            self._reply(200, job)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def kubeconfig(url: str, path: Path) -> Path:
    """A kubeconfig that points the client at ``url``."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "recorded", "cluster": {"server": url}}],
                "users": [{"name": "tester", "user": {"token": "recorded"}}],
                "contexts": [
                    {"name": "recorded", "context": {"cluster": "recorded", "user": "tester"}}
                ],
                "current-context": "recorded",
            }
        )
    )
    return path
