"""Secrets reach a stage only from its environment and go nowhere else.

The canary: every secret a run uses (the S3 keys and session token, an endpoint's API
key, a Hub token) is set to a unique marker, a pipeline that uses all of them runs through
the local backend and is rendered for Kubernetes, and every log line, manifest, metric,
cached answer, config and rendered manifest is searched for the markers. The container
backend's run (tests/integration/test_container_backend.py) is searched the same way.
And the rules that keep a credential out of configs and charts, whatever it is called.
"""

from __future__ import annotations

import uuid

import helm_python
import pytest
import yaml

from jobs.config_file import validate
from jobs.endpoint import EndpointConfig
from jobs.errors import BadInputError
from jobs.secrets import secret_name
from pipeline.chart_values import CHARTS, StageValues
from pipeline.cli import main
from tests.chat_server import ChatServer
from tests.conftest import direct_client
from tests.unit.test_charts import render

SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")
KEY_ENV = "JUDGE_CRED"  # named by the config's api_key_env; not a credential-like name


def canaries(monkeypatch) -> dict[str, str]:
    """Every secret variable set to a marker of its own."""
    markers = {name: f"canary{uuid.uuid4().hex}" for name in (*SECRETS, KEY_ENV)}
    for name, marker in markers.items():
        monkeypatch.setenv(name, marker)
    return markers


def bucket_objects(s3_server: str, bucket: str) -> dict[str, bytes]:
    client = direct_client(s3_server)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def leaks(markers: dict[str, str], places: dict[str, str | bytes]) -> list[str]:
    """``where: which secret`` for every place a marker shows up in."""
    found = []
    for where, content in places.items():
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
        found += [f"{where}: {name}" for name, marker in markers.items() if marker in text]
    return found


def answer(body):
    if body["model"] == "judge":
        return 200, "Total: 9" if "Be kind." in body["messages"][-1]["content"] else "Total: 3", {}
    return 200, "Be kind." if body["model"] == "good" else "Go away.", {}


def test_no_secret_reaches_a_log_manifest_metric_or_rendered_manifest(
    s3_env, s3_server, tmp_path, capfd, monkeypatch
):
    markers = canaries(monkeypatch)
    # the stages' scratch (inputs, caches, checkpoints) is searched too
    monkeypatch.setenv("KUBERLHF_WORKDIR", str(tmp_path / "scratch"))
    with ChatServer(answer, markers[KEY_ENV]) as server:
        endpoint = {"url": server.url, "api_key_env": KEY_ENV, "backoff_s": 0.0}
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(
            yaml.safe_dump(
                {
                    "name": "canary",
                    "store": f"{s3_env}/runs",
                    "kubernetes": {
                        "values": {
                            "s3": {"existingSecret": "s3", "endpoint": s3_server},
                            "env": [
                                {
                                    "name": KEY_ENV,
                                    "valueFrom": {"secretKeyRef": {"name": "judge", "key": "k"}},
                                }
                            ],
                        }
                    },
                    "stages": {
                        "bootstrap": {
                            "config": {"daily_per_lang": 30, "hate_per_lang": 10, "vocab_size": 300}
                        },
                        "data": {
                            "config": {
                                "tokenizer": "${bootstrap.output}/model",
                                "sources": [
                                    {
                                        "name": "daily",
                                        "format": "alpaca",
                                        "uri": "${bootstrap.output}/data/sft_daily.jsonl",
                                    }
                                ],
                            }
                        },
                        "generate": {
                            "config": {
                                "prompts": "${data.output}",
                                "max_prompts": 4,
                                "sources": [
                                    {"name": "good", "endpoint": {**endpoint, "model": "good"}},
                                    {"name": "bad", "endpoint": {**endpoint, "model": "bad"}},
                                ],
                            }
                        },
                        "label": {
                            "config": {
                                "candidates": "${generate.output}",
                                "method": "judge",
                                "judge": {"endpoint": {**endpoint, "model": "judge"}},
                            }
                        },
                    },
                }
            )
        )
        assert main(["run", str(pipeline)]) == 0, capfd.readouterr().err[-3000:]
        ran = capfd.readouterr()  # the stages' own output too: they write to these fds
        assert '"stage": "label"' in ran.out
        assert server.served(), "the endpoint was never asked: its key was never used"
        assert main(["render", str(pipeline)]) == 0
        rendered = capfd.readouterr()

    objects = bucket_objects(s3_server, s3_env.removeprefix("s3://"))
    assert any(key.endswith("label/manifest.json") for key in objects)
    places = {
        "rlhf run output": ran.out + ran.err,
        "rlhf render output": rendered.out + rendered.err,
        **{f"s3://{key}": data for key, data in objects.items()},
        **{str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()},
    }
    assert "kind: ConfigMap" in rendered.out or '"kind": "ConfigMap"' in rendered.out
    assert leaks(markers, places) == []
    # the search itself finds a marker where one is
    assert leaks(markers, {"here": f"x{markers[KEY_ENV]}x"}) == [f"here: {KEY_ENV}"]


@pytest.mark.parametrize(
    ("name", "is_secret"),
    [
        ("AWS_SECRET_ACCESS_KEY", True),
        ("hf_token", True),  # any case
        ("OPENAI_APIKEY", True),  # no underscore before KEY: the old list missed it
        ("GITHUB_PAT_PRIVATE", True),
        ("MY_AUTH_HEADER", True),
        ("DB_PASSWD", True),
        ("TOKENIZERS_PARALLELISM", False),  # a well-known setting, not a token
        ("NCCL_DEBUG", False),
    ],
)
def test_a_name_is_a_credentials_when_it_has_a_credentials_word(name, is_secret):
    assert secret_name(name) is is_secret


JUDGE = {"output": "s3://b/x", "judge": {"endpoint": {"api_key_env": "JUDGE_CRED"}}}
SECRET_REF = {"secretKeyRef": {"name": "judge", "key": "k"}}


@pytest.mark.parametrize(
    "values",
    [
        {"env": [{"name": "hf_token", "value": "x"}]},
        {"env": [{"name": "OPENAI_APIKEY", "value": "x"}]},
        {"config": JUDGE, "env": [{"name": "JUDGE_CRED", "value": "x"}]},
        {
            "config": {"output": "s3://b/x", "rewards": [{"api_key_env": "GRADER"}]},
            "env": [{"name": "GRADER", "value": "x"}],
        },
        {  # from a ConfigMap is in plain text too
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "a", "key": "b"}}}
            ]
        },
        {"s3": {"endpoint": "http://user:pw@minio:9000"}},
        {"s3": {"endpoint": "user:pw@minio:9000"}},  # no scheme: Python would read 'user' as one
        {"s3": {"endpoint": "http://minio:9000/?X-Amz-Security-Token=abc"}},
        {"s3": {"endpoint": "https://acct.blob.example.net/c?sig=abc"}},
    ],
)
def test_helm_and_the_submitter_refuse_a_literal_credential(values):
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmError)):
        render(CHARTS / "sft", values)
    with pytest.raises(ValueError, match="secretKeyRef|URL"):
        StageValues.model_validate({"stage": "sft", **values})


@pytest.mark.parametrize(
    "values",
    [
        {"config": JUDGE, "env": [{"name": "JUDGE_CRED", "valueFrom": SECRET_REF}]},
        {"env": [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}]},
        {"s3": {"endpoint": "http://minio.ml:9000"}},
    ],
)
def test_what_is_not_a_literal_credential_is_accepted(values):
    assert render(CHARTS / "sft", values)
    StageValues.model_validate({"stage": "sft", **values})


@pytest.mark.parametrize(
    "url", ["https://me:sk-123@api.example.com/v1", "https://api.example.com/v1?api_key=sk-123"]
)
def test_an_endpoint_or_s3_url_with_a_credential_is_refused_without_printing_it(url, monkeypatch):
    with pytest.raises(BadInputError, match="credential|user information") as caught:
        validate(EndpointConfig, {"url": url, "model": "m"}, "label.yaml")
    assert "sk-123" not in str(caught.value)

    from jobs import store

    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    store.reset_clients()
    with pytest.raises(BadInputError, match="AWS_ENDPOINT_URL") as caught:
        store.exists("s3://bucket/key")
    assert "sk-123" not in str(caught.value)
    store.reset_clients()
