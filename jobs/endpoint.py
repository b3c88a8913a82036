"""An OpenAI-compatible chat endpoint: for generating responses and for the judge.

The URL comes from the config, the key from an environment variable (a Kubernetes
Secret in a pod) and is never logged. Requests run with a concurrency limit and are
retried with exponential back-off and jitter on 408/409/425/429, every 5xx but 501,
connection errors and a 200 that is no chat completion (honouring Retry-After, capped).
Every answer goes into a cache kept in the stage's output under ``_progress/``, pushed
as it fills, so a restarted or preempted stage never sends a request it already has the
answer to.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from threading import Lock
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs import store
from jobs.contract import PROGRESS
from jobs.errors import BadInputError, Preempted, TransientError
from jobs.secrets import check_url

# What a busy or restarting server answers: asked again after a back-off. Every other
# 5xx is one too (a gateway's 520-524, an overloaded 529), but 501 (not implemented).
RETRY_STATUS = {408, 409, 425, 429}
MAX_RETRY_AFTER_S = 120.0  # a Retry-After longer than this holds a worker no longer


class EndpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="base URL, e.g. https://api.openai.com/v1 (no key in it)")
    model: str = Field(description="the model name the endpoint serves")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable holding the key (None: no key)"
    )
    concurrency: int = Field(4, ge=1)
    max_attempts: int = Field(6, ge=1)
    backoff_s: float = Field(1.0, ge=0, description="first back-off; doubles per attempt")
    timeout_s: float = Field(120, gt=0)
    temperature: float = 0.7
    max_tokens: int = 512

    _url = field_validator("url")(check_url)


class Cache:
    """Answers by key, appended to a local JSONL file and pushed to the store every
    ``sync_s`` seconds (a preempted or killed pod keeps what it was answered) and at the
    end."""

    def __init__(self, output: str, name: str, local: Path, sync_s: float = 30.0) -> None:
        self.remote = store.join(output, PROGRESS, f"{name}.jsonl")
        self.local, self.sync_s = local, sync_s
        self.entries: dict[str, Any] = {}
        self.local.parent.mkdir(parents=True, exist_ok=True)
        if store.exists(self.remote):
            store.download_file(self.remote, self.local)
            for line in self.local.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.entries[record["key"]] = record["value"]
        else:
            self.local.write_text("")
        self._lock = Lock()
        self._synced = time.monotonic()

    def get(self, key: str) -> Any | None:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.entries[key] = value
            with open(self.local, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
            due = time.monotonic() - self._synced > self.sync_s
            if due:  # a copy of the file as it is, uploaded outside the lock
                self._synced = time.monotonic()
                snapshot = self.local.parent / f"{self.local.name}.{threading.get_ident()}.push"
                shutil.copyfile(self.local, snapshot)
        if due:
            try:
                store.upload_file(snapshot, self.remote)
            except Exception as exc:  # noqa: BLE001 - the answer is kept here; pushed later
                print(
                    f"warning: the answer cache could not be pushed to {self.remote} "
                    f"({type(exc).__name__}); trying again at the next push",
                    file=sys.stderr,
                    flush=True,
                )
            finally:
                snapshot.unlink(missing_ok=True)

    def sync(self) -> None:
        """The whole cache to the store (at the end: an error here is the stage's)."""
        with self._lock:
            store.upload_file(self.local, self.remote)
            self._synced = time.monotonic()


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Ask:
    """One request: its turns and settings; ``tag`` tells apart requests otherwise the
    same (the k-th sample of a prompt), ``where`` names its row in an error."""

    messages: list[dict[str, str]]
    overrides: dict[str, Any] = field(default_factory=dict)
    tag: str = ""
    where: str = ""


class ChatClient:
    def __init__(self, config: EndpointConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        import requests

        self.config, self.sleep = config, sleep
        self.session = requests.Session()
        self.headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            # stripped: a Secret made with --from-file usually ends in a newline, which no
            # HTTP header may carry
            key = (os.environ.get(config.api_key_env) or "").strip()
            if not key:
                raise BadInputError(
                    f"endpoint {config.url}: set {config.api_key_env} "
                    "(in Kubernetes, from a Secret)"
                )
            self.headers["Authorization"] = f"Bearer {key}"

    def _redacted(self, text: str) -> str:
        """An answer's text as it may be printed: a gateway that echoes the request's
        headers would otherwise put the key in the log."""
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return (text.replace(key, "***") if key else text)[:200]

    def body(self, ask: Ask) -> dict[str, Any]:
        return {
            "model": self.config.model,
            "messages": ask.messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            **ask.overrides,
        }

    def key(self, ask: Ask) -> str:
        """The cache key of a request: everything that decides its answer (the URL, the
        model, the turns and every setting: a re-run with another temperature or
        max_tokens asks again), and its tag."""
        return cache_key(self.config.url, json.dumps(self.body(ask), sort_keys=True), ask.tag)

    def chat(self, ask: Ask) -> dict[str, str]:
        """The assistant's answer (``text``) and why it ended (``finish_reason``: "stop",
        or "length" for one cut at max_tokens); retried on transient failures."""
        import requests

        body = self.body(ask)
        url = self.config.url.rstrip("/") + "/chat/completions"
        about = f"{url} (for {ask.where})" if ask.where else url
        problem = ""
        for attempt in range(self.config.max_attempts):
            wait = None
            try:
                response = self.session.post(
                    url, json=body, headers=self.headers, timeout=self.config.timeout_s
                )
            except (
                requests.exceptions.InvalidHeader,
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
            ) as exc:
                # a request that can never be sent is the config's fault, not the network's:
                # retried as transient it would spend the Job's retries on a typo (named by
                # type only: an invalid header's message quotes the key)
                raise BadInputError(
                    f"{about}: {type(exc).__name__} (check the URL and {self.config.api_key_env})"
                ) from None
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        choice = response.json()["choices"][0]
                        return {
                            "text": choice["message"]["content"] or "",
                            "finish_reason": str(choice.get("finish_reason") or "stop"),
                        }
                    except (ValueError, KeyError, IndexError, TypeError):
                        # a proxy's error page with status 200: asked again like a 502
                        problem = "an answer that is not a chat completion"
                elif status in {401, 403, 404}:
                    raise BadInputError(
                        f"{about}: HTTP {status} (check the URL, model and "
                        f"{self.config.api_key_env})"
                    )
                elif status not in RETRY_STATUS and not (status >= 500 and status != 501):
                    raise BadInputError(f"{about}: HTTP {status}: {self._redacted(response.text)}")
                else:
                    problem = f"HTTP {status}"
                    wait = _retry_after(response.headers.get("Retry-After"))
            if attempt + 1 < self.config.max_attempts:
                backoff = self.config.backoff_s * 2**attempt
                self.sleep(wait if wait is not None else backoff * (0.5 + random.random()))
        raise TransientError(f"{about}: {problem} after {self.config.max_attempts} attempts")

    def ask_all(
        self, asks: list[Ask], cache: Cache, stop: Callable[[], bool] = lambda: False
    ) -> list[dict[str, str]]:
        """Answers to ``asks``, in order: each asked once, at most ``concurrency`` at a
        time, what the cache holds not at all. The cache reaches the store as it fills
        and at the end, even when a request finally fails; once ``stop()`` (SIGTERM) no
        new request starts, and the stage ends as preempted, to be resumed."""
        keys = [self.key(ask) for ask in asks]
        todo = {key: ask for key, ask in zip(keys, asks, strict=True) if cache.get(key) is None}

        def ask(key: str) -> None:
            if stop():
                return
            cache.put(key, self.chat(todo[key]))

        try:
            with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
                for _ in pool.map(ask, todo):
                    pass
        finally:
            cache.sync()
        if stop():
            missing = sum(cache.get(key) is None for key in todo)
            raise Preempted(
                f"SIGTERM received: {len(todo) - missing} answers of {len(todo)} kept in "
                f"{cache.remote}; the restarted stage asks for the other {missing}"
            )
        return [cache.get(key) for key in keys]


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds or as an HTTP date, capped at MAX_RETRY_AFTER_S."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)
