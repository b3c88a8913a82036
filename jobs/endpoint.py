"""An OpenAI-compatible chat endpoint: for generating responses and for the judge.

The URL comes from the config, the key from an environment variable (a Kubernetes
Secret in a pod) and is never logged. Requests run with a concurrency limit and are
retried with exponential back-off and jitter on 429, 5xx and connection errors
(honouring Retry-After). Every answer goes into a cache kept in the stage's output
under ``_progress/``, so a restarted stage never sends a request it already has the
answer to.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Lock
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobs import store
from jobs.contract import PROGRESS
from jobs.errors import BadInputError, TransientError
from jobs.secrets import check_url

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


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
    """Answers by key, appended to a local JSONL file and pushed to the store."""

    def __init__(self, output: str, name: str, local: Path) -> None:
        self.remote = store.join(output, PROGRESS, f"{name}.jsonl")
        self.local = local
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

    def get(self, key: str) -> Any | None:
        return self.entries.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self.entries[key] = value
            with open(self.local, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")

    def sync(self) -> None:
        store.upload_file(self.local, self.remote)


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class ChatClient:
    def __init__(self, config: EndpointConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        import requests

        self.config, self.sleep = config, sleep
        self.session = requests.Session()
        self.headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
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

    def chat(self, messages: list[dict[str, str]], **overrides: Any) -> str:
        """The assistant's answer; retried on transient failures."""
        import requests

        body = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            **overrides,
        }
        url = self.config.url.rstrip("/") + "/chat/completions"
        problem = ""
        for attempt in range(self.config.max_attempts):
            try:
                response = self.session.post(
                    url, json=body, headers=self.headers, timeout=self.config.timeout_s
                )
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}"
                wait = None
            else:
                if response.status_code == 200:
                    try:
                        return response.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError):
                        raise TransientError(f"{url}: answer is not a chat completion") from None
                if response.status_code in {401, 403, 404}:
                    raise BadInputError(
                        f"{url}: HTTP {response.status_code} (check the URL, "
                        f"model and {self.config.api_key_env})"
                    )
                if response.status_code not in RETRY_STATUS:
                    raise BadInputError(
                        f"{url}: HTTP {response.status_code}: {self._redacted(response.text)}"
                    )
                problem = f"HTTP {response.status_code}"
                wait = _retry_after(response.headers.get("Retry-After"))
            if attempt + 1 < self.config.max_attempts:
                backoff = self.config.backoff_s * 2**attempt
                self.sleep(wait if wait is not None else backoff * (0.5 + random.random()))
        raise TransientError(f"{url}: {problem} after {self.config.max_attempts} attempts")

    def ask_all(
        self, requests: list[tuple[str, list[dict[str, str]], dict[str, Any]]], cache: Cache
    ) -> list[str]:
        """Answers to (cache key, messages, overrides) requests, in order: each key asked
        once, at most ``concurrency`` at a time, what the cache holds not at all. The
        cache reaches the store even when a request finally fails."""
        todo = {
            key: (messages, overrides)
            for key, messages, overrides in requests
            if cache.get(key) is None
        }

        def ask(key: str) -> None:
            messages, overrides = todo[key]
            cache.put(key, self.chat(messages, **overrides))

        try:
            with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
                for _ in pool.map(ask, todo):
                    pass
        finally:
            cache.sync()
        return [cache.get(key) for key, _, _ in requests]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
