"""An HTTP proxy in front of the test's S3 server that injects the faults real object stores
show: 500/503/SlowDown answers, connection resets, stalls past the client's read timeout,
truncated bodies, a SIGKILL of the stage at the moment a chosen request arrives, or any
other action then (filling the stage's disk).

A stage talks to it as to any S3 endpoint (``AWS_ENDPOINT_URL``); nothing in the stage
knows it is there. Rules pick requests by method and a regular expression on the path, at
chosen positions (the n-th match) or at random with a seeded generator, so a failing run
can be replayed. Every fault fired is recorded for the suite's report.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = (
    "500",
    "503",
    "slowdown",
    "reset",
    "stall",
    "truncate",
    "500-after",  # the store did it, the answer says it failed: the retry replays it
    "reset-after",  # the store did it, the answer is lost
    "kill",
    "kill-after",
    "act",
)

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """Which requests get a fault: ``kind`` on the ``nth`` request (1-based) matching
    ``method`` and ``path`` (a regular expression searched in the URL path), on every one of
    them after that for ``times`` requests, or on each with probability ``p``."""

    kind: str
    method: str = ".*"
    path: str = ".*"
    nth: int | None = None
    times: int = 1
    p: float = 0.0
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {KINDS}")

    def wants(self, method: str, path: str, rng: random.Random) -> bool:
        if not (re.fullmatch(self.method, method) and re.search(self.path, path)):
            return False
        self.seen += 1
        if self.nth is not None:
            hit = self.nth <= self.seen < self.nth + self.times
        else:
            hit = rng.random() < self.p
        self.fired += hit
        return hit


@dataclass
class Event:
    method: str
    path: str
    kind: str


class FaultProxy:
    """``with FaultProxy(upstream) as proxy:`` serves on ``proxy.url`` until the block ends."""

    def __init__(self, upstream: str, seed: int = 0, stall_s: float = 4.0) -> None:
        self.upstream = urlsplit(upstream)
        self.rng = random.Random(seed)
        self.stall_s = stall_s
        self.rules: list[Rule] = []
        self.events: list[Event] = []
        self.requests = 0
        self.action: Callable[[], None] | None = None  # what "kill" and "act" do
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.errors: list[str] = []  # the proxy's own failures, which a test must not see
        self._server.handle_error = self._handle_error
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handle_error(self, request, address) -> None:  # noqa: ARG002 - socketserver's
        error = sys.exc_info()[1]
        # a client that gives up on a stalled answer resets its connection: not news
        if not isinstance(error, ConnectionError | TimeoutError):
            self.errors.append(f"{type(error).__name__}: {error}")

    def set_rules(self, *rules: Rule, action: Callable[[], None] | None = None) -> None:
        with self._lock:
            self.rules = list(rules)
            self.action = action

    def _choose(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if rule.wants(method, path, self.rng):
                    self.events.append(Event(method, path, rule.kind))
                    return rule.kind
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the events list is the record
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        size_line = self.rfile.readline()
                        raw += size_line
                        size = int(size_line.split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            # trailers (aws-chunked checksums) end with an empty line
                            while chunk not in (b"\r\n", b""):
                                chunk = self.rfile.readline()
                                raw += chunk
                            return raw
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                # SO_LINGER 0: close with a TCP RST, as a load balancer dropping the flow does
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True

            def _error(self, kind: str) -> None:
                status, code, message = _ERRORS[kind]
                xml = (
                    f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                    f"<Message>{message}</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                hop = {"connection", "transfer-encoding", "keep-alive"}
                if self.command != "HEAD":  # a HEAD's length is the object's: keep it
                    hop.add("content-length")
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in hop]
                return response.status, kept, data

            def _handle(self) -> None:
                body = self._body()
                kind = proxy._choose(self.command, urlsplit(self.path).path)
                if kind in _ERRORS:
                    return self._error(kind)
                if kind == "reset":
                    return self._reset()
                if kind == "stall":
                    time.sleep(proxy.stall_s)
                    return self._reset()
                if kind == "kill":  # the stage dies with this request in flight, unanswered
                    proxy.action()
                    return self._reset()
                if kind == "act":  # something happens to the stage's node (a disk fills)
                    proxy.action()
                status, headers, data = self._forward(body)
                if kind == "kill-after":  # the store has done it; the stage never hears so
                    proxy.action()
                    return self._reset()
                if kind == "reset-after":
                    return self._reset()
                if kind == "500-after":
                    return self._error("500")
                self.send_response(status)
                if kind == "truncate" and len(data) < 2:
                    return self._reset()  # nothing to cut short: the connection drops
                for name, value in headers:
                    self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if kind == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    return self._reset()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
