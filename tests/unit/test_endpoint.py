"""The chat endpoint client against a real HTTP server started by the test: what it
retries and for how long it waits, what it refuses naming the row, and a cache that
reaches the store while it fills."""

from __future__ import annotations

import email.utils
import json
import time

import pytest

from jobs import store
from jobs.endpoint import Ask, Cache, ChatClient, EndpointConfig
from jobs.errors import BadInputError
from tests.chat_server import ChatServer

KEY = "endpoint-test-key-42"


def client(server, waits: list[float], **extra) -> ChatClient:
    config = EndpointConfig(
        url=server.url, model="m", api_key_env="ENDPOINT_TEST_KEY", backoff_s=0.5, **extra
    )
    return ChatClient(config, sleep=waits.append)


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("ENDPOINT_TEST_KEY", KEY)


def failing_first(*failures):
    """Answers the given failures in turn, then a completion."""
    left = list(failures)

    def answer(body):
        return left.pop(0) if left else (200, "fine", {})

    return answer


def test_gateway_and_overload_errors_and_a_non_json_200_are_asked_again():
    answer = failing_first(
        (520, "origin error", {}),
        (529, "overloaded", {}),
        (200, "<html>502 Bad Gateway</html>", {}, "raw"),
        (503, "restarting", {}),
    )
    waits: list[float] = []
    with ChatServer(answer, KEY) as server:
        got = client(server, waits).chat(Ask([{"role": "user", "content": "hi"}]))
    assert got == {"text": "fine", "finish_reason": "stop"}
    assert len(waits) == 4 and len(server.requests) == 5


@pytest.mark.parametrize("status", [400, 413, 501])
def test_a_refused_request_names_its_row(status):
    waits: list[float] = []
    refused = pytest.raises(BadInputError, match=rf"for prompts/train.jsonl:7\): HTTP {status}")
    with ChatServer(failing_first((status, "context length exceeded", {})), KEY) as server, refused:
        client(server, waits).chat(
            Ask([{"role": "user", "content": "hi"}], where="prompts/train.jsonl:7")
        )
    assert waits == [] and len(server.requests) == 1  # not asked again


def test_retry_after_is_honoured_as_seconds_or_a_date_and_capped():
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    answer = failing_first(
        (429, "slow down", {"Retry-After": "86400"}),  # a day: capped
        (429, "slow down", {"Retry-After": "7"}),
        (503, "later", {"Retry-After": soon}),
    )
    waits: list[float] = []
    with ChatServer(answer, KEY) as server:
        client(server, waits).chat(Ask([{"role": "user", "content": "hi"}]))
    assert waits[:2] == [120.0, 7.0]
    assert 25 < waits[2] <= 30


def test_an_answer_cut_at_max_tokens_says_so():
    with ChatServer(lambda body: (200, "Helpfulness: 4\nHarm", {}, "length"), KEY) as server:
        got = client(server, []).chat(Ask([{"role": "user", "content": "rate this"}]))
    assert got == {"text": "Helpfulness: 4\nHarm", "finish_reason": "length"}


def test_the_cache_key_holds_every_setting_of_the_request():
    with ChatServer(lambda body: (200, "x", {}), KEY) as server:
        warm, hot = client(server, [], temperature=0.7), client(server, [], temperature=1.2)
    ask = Ask([{"role": "user", "content": "hi"}])
    assert warm.key(ask) != hot.key(ask)
    assert warm.key(ask) != warm.key(Ask(ask.messages, {"max_tokens": 16}))
    assert warm.key(ask) != warm.key(Ask(ask.messages, tag="1"))
    assert warm.key(ask) == warm.key(Ask([{"role": "user", "content": "hi"}]))


def test_the_cache_reaches_the_store_as_it_fills(tmp_path):
    """A pod killed without warning (SIGKILL, a node lost) keeps what it was answered up
    to the last push, not only what a finished or failed stage pushes at its end."""
    output = str(tmp_path / "out")
    cache = Cache(output, "generate-x", tmp_path / "local.jsonl", sync_s=0.0)
    cache.put("k1", {"text": "one", "finish_reason": "stop"})
    remote = store.join(output, "_progress", "generate-x.jsonl")
    assert [json.loads(x)["key"] for x in store.read_text(remote).splitlines()] == ["k1"]
    again = Cache(output, "generate-x", tmp_path / "other.jsonl")
    assert again.get("k1") == {"text": "one", "finish_reason": "stop"}


def test_a_push_that_fails_costs_a_warning_not_the_answers(tmp_path, capsys):
    """The store down for a moment while the cache fills: the answers are kept here and
    pushed at the next push; only the push at the end is the stage's to fail."""
    output = tmp_path / "out"
    cache = Cache(str(output), "generate-x", tmp_path / "local.jsonl", sync_s=0.0)
    (output / "_progress").mkdir(parents=True)
    (output / "_progress" / "generate-x.jsonl").mkdir()  # a folder where the file goes
    cache.put("k1", {"text": "one", "finish_reason": "stop"})
    assert "could not be pushed" in capsys.readouterr().err
    assert cache.get("k1") == {"text": "one", "finish_reason": "stop"}
    (output / "_progress" / "generate-x.jsonl").rmdir()
    cache.put("k2", {"text": "two", "finish_reason": "stop"})
    again = Cache(str(output), "generate-x", tmp_path / "other.jsonl")
    assert again.get("k1") and again.get("k2")


def test_a_key_from_a_secret_file_ends_in_a_newline_and_still_works(monkeypatch):
    """kubectl create secret --from-file keeps the file's last newline: no HTTP header may
    carry one, so every request failed, was retried as transient and cost the Job."""
    monkeypatch.setenv("ENDPOINT_TEST_KEY", KEY + "\n")
    waits: list[float] = []
    with ChatServer(failing_first(), KEY) as server:
        got = client(server, waits).chat(Ask([{"role": "user", "content": "hi"}]))
    assert got["text"] == "fine" and waits == []


def test_a_request_that_can_never_be_sent_is_a_bad_input_that_hides_the_key(monkeypatch):
    monkeypatch.setenv("ENDPOINT_TEST_KEY", KEY + "\nX-Injected: 1")
    waits: list[float] = []
    refused = pytest.raises(BadInputError, match="InvalidHeader")
    with ChatServer(failing_first(), KEY) as server, refused as info:
        client(server, waits).chat(Ask([{"role": "user", "content": "hi"}], where="p:1"))
    assert waits == [] and KEY not in str(info.value)
