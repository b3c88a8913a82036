"""The data stage: filters with counts in the manifest, mixing by ratio, outputs per use."""

from __future__ import annotations

import json

import pytest

from jobs.contract import run_stage
from jobs.data import stage as data
from jobs.data.readers import Example, Message
from jobs.errors import BadInputError
from tests.conftest import FIXTURES, snapshot


def write_alpaca(path, rows):
    with open(path, "w") as handle:
        for instruction, output in rows:
            handle.write(
                json.dumps({"instruction": instruction, "input": "", "output": output}) + "\n"
            )


def run_data(tmp_path, sources, **options):
    config = data.Config(output=str(tmp_path / "out"), sources=sources, **options)
    return run_stage("data", config, data.run, workdir=tmp_path / "work")


def test_length_filter_drops_fifteen_tokens_or_fewer_and_counts_them(tmp_path):
    # Whitespace tokens when no tokenizer is given: 8 + 7 = 15 (dropped), 8 + 8 = 16 (kept).
    write_alpaca(
        tmp_path / "a.jsonl",
        [
            ("one two three four five six seven eight", "a b c d e f g"),
            ("one two three four five six seven eight", "a b c d e f g h"),
            ("short", "reply"),
        ],
    )
    manifest = run_data(
        tmp_path,
        [{"name": "a", "format": "alpaca", "uri": str(tmp_path / "a.jsonl")}],
        dedup_threshold=None,
        eval_fraction=0,
    )
    counts = manifest.metrics["sources"]["a"]
    assert counts == {
        "read": 3,
        "dropped_short": 2,
        "dropped_duplicate": 0,
        "dropped_mix": 0,
        "kept": 1,
    }
    rows = (tmp_path / "out" / "sft" / "train.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["response"] == "a b c d e f g h"


def test_near_duplicates_are_dropped_and_counted_per_source(tmp_path):
    long = "please tell me how to water a basil plant on a sunny windowsill in the summer heat"
    write_alpaca(tmp_path / "a.jsonl", [(long, "water it in the morning when the soil is dry")])
    write_alpaca(
        tmp_path / "b.jsonl",
        [
            (long, "water it in the morning when the soil is dry"),
            (
                "what is the best way to practise the guitar every evening after a long day",
                "ten focused minutes of scales then a song you love",
            ),
        ],
    )
    manifest = run_data(
        tmp_path,
        [
            {"name": "a", "format": "alpaca", "uri": str(tmp_path / "a.jsonl")},
            {"name": "b", "format": "alpaca", "uri": str(tmp_path / "b.jsonl")},
        ],
        eval_fraction=0,
    )
    assert manifest.metrics["sources"]["a"]["dropped_duplicate"] == 0
    assert manifest.metrics["sources"]["b"]["dropped_duplicate"] == 1
    assert manifest.metrics["sources"]["b"]["kept"] == 1


def test_mixing_gives_the_asked_proportions():
    groups = {
        "daily": [Example("daily", [Message("user", str(i))]) for i in range(1000)],
        "hate": [Example("hate", [Message("user", str(i))]) for i in range(300)],
        "general": [Example("general", [Message("user", str(i))]) for i in range(50)],
    }
    sources = [
        data.SourceConfig(name="daily", format="alpaca", uri="x", ratio=2),
        data.SourceConfig(name="hate", format="alpaca", uri="x", ratio=1),
        data.SourceConfig(name="general", format="alpaca", uri="x"),  # no ratio: all of it
    ]
    import random

    mixed = data.mix(groups, sources, random.Random(0), max_examples=None)
    assert (len(mixed["daily"]), len(mixed["hate"]), len(mixed["general"])) == (600, 300, 50)
    capped = data.mix(groups, sources, random.Random(0), max_examples=90)
    assert (len(capped["daily"]), len(capped["hate"])) == (60, 30)


def test_mix_ratio_holds_in_the_written_output(tiny, tmp_path):
    manifest = run_data(
        tmp_path,
        [
            {
                "name": "daily",
                "format": "alpaca",
                "uri": str(tiny / "data/sft_daily.jsonl"),
                "ratio": 2,
            },
            {
                "name": "hate",
                "format": "alpaca",
                "uri": str(tiny / "data/sft_hate.jsonl"),
                "ratio": 1,
            },
        ],
        dedup_threshold=None,
        eval_fraction=0.1,
    )
    rows = []
    for split in ("train", "eval"):
        rows += [
            json.loads(line)
            for line in (tmp_path / "out" / "sft" / f"{split}.jsonl").read_text().splitlines()
        ]
    by_source = {s: sum(r["source"] == s for r in rows) for s in ("daily", "hate")}
    assert by_source["daily"] == 2 * by_source["hate"]
    assert manifest.metrics["rows"]["sft.eval"] == round(0.1 * len(rows))


def test_every_reader_feeds_its_outputs(tmp_path):
    manifest = run_data(
        tmp_path,
        [
            {"name": "alpaca", "format": "alpaca", "uri": str(FIXTURES / "alpaca.jsonl")},
            {"name": "kullm", "format": "alpaca", "uri": str(FIXTURES / "kullm.json")},
            {"name": "dahoas", "format": "pairs", "uri": str(FIXTURES / "dahoas_pairs.jsonl")},
            {"name": "hh", "format": "hh", "uri": str(FIXTURES / "hh.jsonl")},
            {
                "name": "sharegpt",
                "format": "sharegpt",
                "uri": str(FIXTURES / "sharegpt.json"),
                "label_field": "model",
            },
        ],
        min_tokens=0,
        dedup_threshold=None,
        eval_fraction=0,
        template="alpaca",
    )
    assert manifest.metrics["rows"] == {"sft.train": 7, "prompts.train": 11, "pairs.train": 4}
    pairs = [json.loads(x) for x in (tmp_path / "out/pairs/train.jsonl").read_text().splitlines()]
    assert all(p["prompt"].endswith("### Response:\n") for p in pairs)
    sft = [json.loads(x) for x in (tmp_path / "out/sft/train.jsonl").read_text().splitlines()]
    assert {r.get("label") for r in sft if r["source"] == "sharegpt"} == {"gpt-4", "gpt-3.5-turbo"}


def test_empty_after_filtering_is_a_clear_error_and_changes_nothing(tmp_path):
    write_alpaca(
        tmp_path / "a.jsonl", [("one two three four five six seven eight nine", "a b c d e f g h")]
    )
    run_data(
        tmp_path,
        [{"name": "a", "format": "alpaca", "uri": str(tmp_path / "a.jsonl")}],
        eval_fraction=0,
    )
    before = snapshot(tmp_path / "out")

    write_alpaca(tmp_path / "a.jsonl", [("hi", "hello")])
    with pytest.raises(
        BadInputError, match=r"no examples left after filtering \(a: read 1, short 1"
    ):
        run_data(
            tmp_path,
            [{"name": "a", "format": "alpaca", "uri": str(tmp_path / "a.jsonl")}],
            eval_fraction=0,
        )
    assert snapshot(tmp_path / "out") == before
