"""A small OpenAI-compatible chat server for tests (the real services are external).

It answers ``POST /v1/chat/completions`` through a function of the request body, checks
the bearer key, and records every request, so tests can count what was asked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# answer(body) -> (status, content or error text, extra headers[, finish_reason]); a
# finish_reason of "raw" sends the text as the whole body (a proxy's error page)
Answer = Callable[[dict[str, Any]], tuple]


class ChatServer:
    def __init__(self, answer: Answer, key: str) -> None:
        self.answer, self.key = answer, key
        self.requests: list[tuple[int, dict[str, Any]]] = []  # (status served, body)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {server.key}":
                    status, text, headers = 401, "bad key", {}
                elif self.path != "/v1/chat/completions":
                    status, text, headers = 404, "no such path", {}
                else:
                    status, text, headers, *finish = server.answer(body)
                with server._lock:
                    server.requests.append((status, body))
                finish_reason = finish[0] if finish else "stop"
                payload = (
                    json.dumps(
                        {
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish_reason,
                                }
                            ]
                        }
                    )
                    if status == 200
                    else json.dumps({"error": {"message": text}})
                )
                if finish == ["raw"]:
                    payload = text
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()

    def served(self, status: int = 200) -> list[dict[str, Any]]:
        return [body for code, body in self.requests if code == status]
