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


def split_data(tmp_path, sources: dict[str, str], **options):
    """The data stage over ``<name>.jsonl`` files of the given formats: raw prompts, no
    filter, so that only the split decides where a row goes."""
    listed = [
        {"name": name, "format": fmt, "uri": str(tmp_path / f"{name}.jsonl")}
        for name, fmt in sources.items()
    ]
    settings = {"template": "raw", "min_tokens": 0, "dedup_threshold": None, **options}
    return run_data(tmp_path, listed, **settings)


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
        "dropped_empty": 0,
        "dropped_short": 2,
        "dropped_same_pair": 0,
        "dropped_duplicate": 0,
        "dropped_mix": 0,
        "kept": 1,
        "shared_prompts": 0,
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
    rows = {}
    for split in ("train", "eval"):
        rows[split] = [
            json.loads(line)
            for line in (tmp_path / "out" / "sft" / f"{split}.jsonl").read_text().splitlines()
        ]
    every = rows["train"] + rows["eval"]
    by_source = {s: sum(r["source"] == s for r in every) for s in ("daily", "hate")}
    assert by_source["daily"] == 2 * by_source["hate"]
    # The eval share is counted in distinct prompts (each prompt on one side only): a
    # tenth of them, up to chance (each prompt's side is a hash of it), within 4 sigma.
    n, held = len({r["prompt"] for r in every}), {r["prompt"] for r in rows["eval"]}
    assert manifest.metrics["eval_prompts"] == len(held)
    assert abs(len(held) - 0.1 * n) < 4 * (n * 0.1 * 0.9) ** 0.5


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
    # a prompt keeps its turns for chat endpoints and chat templates (its system prompt and
    # the earlier exchange), and an Alpaca input joins the instruction
    prompts = [
        json.loads(x) for x in (tmp_path / "out/prompts/train.jsonl").read_text().splitlines()
    ]
    italy = next(r for r in prompts if r["instruction"].endswith("And of Italy?"))
    assert italy["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    with_input = [r for r in prompts if r["source"] == "alpaca" and "\n\n" in r["instruction"]]
    assert with_input and all(
        r["messages"] == [{"role": "user", "content": r["instruction"]}] for r in with_input
    )


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


def test_a_prompt_shared_by_sources_lands_on_one_side_of_the_split_only(tmp_path):
    # 40 instructions with SFT answers; 20 of them also as preference pairs (as an SFT set
    # and a preference set of one origin share prompts), one of them twice in the SFT set.
    prompts = [f"Question number {n} about topic {n * 7 % 13} please" for n in range(40)]
    write_alpaca(
        tmp_path / "sft.jsonl",
        [(p, f"answer {n} in words") for n, p in enumerate(prompts)]
        + [(prompts[3].upper(), "the same question shouted")],
    )
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for n, p in enumerate(prompts[:20]):
            row = {"prompt": p, "chosen": f"good {n} answer", "rejected": f"bad {n} answer"}
            handle.write(json.dumps(row) + "\n")
    sources = {"sft": "alpaca", "pairs": "pairs"}
    manifest = split_data(tmp_path, sources, eval_fraction=0.25, judge_fraction=0.25)
    sides: dict[str, set[str]] = {}
    for split in ("train", "eval", "judge"):
        for output in ("sft", "pairs", "prompts"):
            path = tmp_path / "out" / output / f"{split}.jsonl"
            for line in path.read_text().splitlines() if path.is_file() else []:
                sides.setdefault(split, set()).add(json.loads(line)["prompt"].casefold())
    assert sides["train"] and sides["eval"] and sides["judge"]
    assert not sides["train"] & sides["eval"], len(sides["train"] & sides["eval"])
    assert not sides["train"] & sides["judge"]
    assert not sides["eval"] & sides["judge"]
    assert manifest.metrics["cross_source_prompts"] == 20
    assert manifest.metrics["sources"]["sft"]["shared_prompts"] == 20
    assert manifest.metrics["sources"]["pairs"]["shared_prompts"] == 20
    # a quarter each, up to chance (40 prompts: 10 +- 2.7)
    assert (manifest.metrics["eval_prompts"], manifest.metrics["judge_prompts"]) == (
        len({p for p in sides["eval"]}),
        len({p for p in sides["judge"]}),
    )
    assert 4 <= manifest.metrics["eval_prompts"] <= 16
    assert 4 <= manifest.metrics["judge_prompts"] <= 16


def test_conversations_that_open_alike_land_on_one_side_of_the_split(tmp_path):
    """40 openings, each as a one-turn conversation and as two two-turn ones that go on
    differently: under a chat template SFT trains every assistant turn, so an eval
    conversation whose first exchange another conversation trains on is no held-out one.
    Split by the whole history, 24 of 40 openings had conversations on both sides."""
    chats = []
    for n in range(40):
        opening = [
            {"from": "human", "value": f"Tell me about subject {n} in detail"},
            {"from": "gpt", "value": f"Subject {n} is a large field."},
        ]
        chats.append({"conversations": opening})
        for follow in ("history", "uses"):
            chats.append(
                {
                    "conversations": opening
                    + [
                        {"from": "human", "value": f"And its {follow}?"},
                        {"from": "gpt", "value": f"Its {follow} are long."},
                    ]
                }
            )
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    manifest = split_data(tmp_path, {"chat": "sharegpt"}, eval_fraction=0.3)
    sides: dict[str, set[str]] = {}
    for split in ("train", "eval"):
        for line in (tmp_path / "out" / "sft" / f"{split}.jsonl").read_text().splitlines():
            first = next(m for m in json.loads(line)["messages"] if m["role"] == "user")
            sides.setdefault(split, set()).add(first["content"])
    assert sides["train"] and sides["eval"]
    assert not sides["train"] & sides["eval"], len(sides["train"] & sides["eval"])
    # each eval opening's three conversations are three prompts
    assert manifest.metrics["eval_prompts"] == 3 * len(sides["eval"])


def test_a_system_prompt_does_not_make_a_question_another(tmp_path):
    """One source asks its questions under a system prompt (orca), another plainly: the
    same question is one prompt for the split, on one side only, and a judge or endpoint
    reading `prompts/` gets an Alpaca input with its instruction."""
    questions = [f"What is {n} plus {n * 3} in words, please?" for n in range(30)]
    with open(tmp_path / "orca.jsonl", "w") as handle:
        for n, q in enumerate(questions):
            row = {"system": "You are an AI assistant.", "question": q}
            handle.write(json.dumps({**row, "chosen": f"good {n}", "rejected": f"bad {n}"}) + "\n")
    with open(tmp_path / "plain.jsonl", "w") as handle:
        for n, q in enumerate(questions):
            handle.write(json.dumps({"instruction": q, "input": "", "output": f"a{n}"}) + "\n")
            row = {"instruction": "Summarize the note.", "input": f"text {n}", "output": "x"}
            handle.write(json.dumps(row) + "\n")
    manifest = split_data(tmp_path, {"orca": "pairs", "plain": "alpaca"}, eval_fraction=0.3)
    assert manifest.metrics["cross_source_prompts"] == 30  # each question, system or not
    sides = {}
    for split in ("train", "eval"):
        pairs = tmp_path / "out" / "pairs" / f"{split}.jsonl"
        sft = tmp_path / "out" / "sft" / f"{split}.jsonl"
        texts = [json.loads(x)["prompt"] for x in pairs.read_text().splitlines()]
        texts += [json.loads(x)["prompt"] for x in sft.read_text().splitlines()]
        sides[split] = {q for q in questions for t in texts if q in t}
    assert sides["train"] and sides["eval"] and not sides["train"] & sides["eval"]
    prompts = [
        json.loads(x)
        for split in ("train", "eval")
        for x in (tmp_path / "out" / "prompts" / f"{split}.jsonl").read_text().splitlines()
    ]
    with_input = [p for p in prompts if "text 7" in p["prompt"]]
    assert with_input and with_input[0]["instruction"].endswith("\n\ntext 7")


def test_a_custom_template_keeps_every_input_or_says_why_not(tmp_path):
    from jobs.data.templates import render_prompt

    asked = [Message("user", "print(f'{input}')")]
    assert render_prompt("Q: {prompt}\n{input}\nA:", asked, "x = 1") == (
        "Q: print(f'{input}')\nx = 1\nA:"  # the user's braces are text, not a placeholder
    )
    rows = [{"instruction": "Summarize this.", "input": "THE TEXT", "output": "A summary."}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadInputError, match=r"b\.jsonl:1: template .*no \{input\}"):
        split_data(tmp_path, {"b": "alpaca"}, template="Q: {prompt}\nA:", eval_fraction=0)


@pytest.mark.parametrize("template", ["kulm", "### Question:\n{question}\n### Answer:\n"])
def test_a_template_that_would_drop_the_instruction_is_refused(template):
    """A misspelt preset, or a custom template without {prompt}, rendered every example as
    the same constant text: SFT would learn its answers to no question."""
    from pydantic import ValidationError

    sources = [{"name": "a", "format": "alpaca", "uri": "a.jsonl"}]
    with pytest.raises(ValidationError, match=r"template .* is none of kullm, alpaca, chat"):
        data.Config(output="o", sources=sources, template=template)
    for good in ("kullm", "raw", "### Question:\n{prompt}\n### Answer:\n"):
        assert data.Config(output="o", sources=sources, template=good).template == good


def test_a_renamed_column_is_named_as_the_data_set_names_it(tmp_path):
    rows = [{"instruction": "Summarize this.", "answer": "  "}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"name": "a", "format": "alpaca", "uri": str(tmp_path / "a.jsonl")}
    with pytest.raises(
        BadInputError, match=r"a\.jsonl:1: field 'answer' \(read as 'output'\) is missing"
    ):
        run_data(tmp_path, [{**source, "columns": {"output": "answer"}}], eval_fraction=0)


def test_a_whitespace_question_is_named_as_missing(tmp_path):
    rows = [{"prompt": "   ", "chosen": "a", "rejected": "b"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadInputError, match=r"p\.jsonl:1: field 'prompt' \(or 'question'\)"):
        split_data(tmp_path, {"p": "pairs"}, eval_fraction=0)


def test_a_cap_without_a_mix_is_refused():
    from pydantic import ValidationError

    sources = [{"name": "a", "format": "alpaca", "uri": "a.jsonl"}]
    with pytest.raises(ValidationError, match="max_examples caps the mix"):
        data.Config(output="o", sources=sources, max_examples=10)
    data.Config(output="o", sources=[{**sources[0], "ratio": 1}], max_examples=10)


def test_a_pair_without_a_preference_is_dropped_and_counted(tmp_path):
    rows = [
        {"prompt": "Which is kinder?", "chosen": "Thank you.", "rejected": "Go away."},
        {"prompt": "Say hi.", "chosen": "Hi there.", "rejected": "Hi there."},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = split_data(tmp_path, {"p": "pairs"}, eval_fraction=0)
    counts = manifest.metrics["sources"]["p"]
    assert (counts["dropped_same_pair"], counts["kept"]) == (1, 1)
    [kept] = (tmp_path / "out" / "pairs" / "train.jsonl").read_text().splitlines()
    assert json.loads(kept)["chosen"] == "Thank you."


def test_a_system_prompt_shared_by_every_row_makes_no_duplicates(tmp_path):
    """Orca-style rows carry one long system prompt: four different questions are four
    examples; the same question under another system prompt is still a duplicate."""
    system = (
        "You are an AI assistant. User will give you a task. Your goal is to complete the "
        "task as faithfully as you can. While performing the task think step-by-step and "
        "justify your steps. You should describe the task and explain your answer."
    )
    questions = [
        ("What is the capital of Peru?", "Lima is the capital of Peru."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("Translate 'thank you' into German.", "Danke is thank you in German."),
        ("Name a prime number above ten.", "Eleven is a prime number."),
    ]
    rows = [
        {"system": system, "question": q, "chosen": a, "rejected": "I do not know."}
        for q, a in questions
    ]
    rows.append({"system": "Be brief.", **{k: rows[0][k] for k in ("question", "chosen")}})
    rows[-1]["rejected"] = "No idea."
    (tmp_path / "orca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = split_data(tmp_path, {"orca": "pairs"}, dedup_threshold=0.5, eval_fraction=0)
    counts = manifest.metrics["sources"]["orca"]
    assert (counts["kept"], counts["dropped_duplicate"]) == (4, 1)


def test_a_mixed_source_left_empty_is_an_error_not_an_empty_mix(tmp_path):
    write_alpaca(
        tmp_path / "big.jsonl", [(f"question {n} " * 5, f"answer {n} " * 5) for n in range(20)]
    )
    write_alpaca(tmp_path / "tiny.jsonl", [("hi", "hello")])  # short: filtered out
    sources = [
        {"name": "big", "format": "alpaca", "uri": str(tmp_path / "big.jsonl"), "ratio": 2},
        {"name": "tiny", "format": "alpaca", "uri": str(tmp_path / "tiny.jsonl"), "ratio": 1},
    ]
    with pytest.raises(BadInputError, match=r"source 'tiny' has a ratio and no examples left"):
        run_data(tmp_path, sources, dedup_threshold=None, eval_fraction=0)
    # the control: with a row that survives, the mix is 2 to 1
    write_alpaca(
        tmp_path / "tiny.jsonl",
        [(f"a longer question {n} " * 3, "a b c d e f g h i") for n in range(5)],
    )
    manifest = run_data(tmp_path, sources, dedup_threshold=None, eval_fraction=0)
    kept = {name: c["kept"] for name, c in manifest.metrics["sources"].items()}
    assert kept == {"big": 10, "tiny": 5}


def test_an_empty_answer_is_dropped_and_counted(tmp_path):
    """An HH dialogue that ends on "Assistant:" and a ShareGPT turn without text: nothing
    to train towards, so neither reaches pairs/ or sft/."""
    cats, plants = "\n\nHuman: A joke about cats?", "\n\nHuman: How do plants grow in spring?"
    hh = [
        {"chosen": f"{cats}\n\nAssistant:", "rejected": f"{cats}\n\nAssistant: No jokes today."},
        {
            "chosen": f"{plants}\n\nAssistant: With sun and water.",
            "rejected": f"{plants}\n\nAssistant: Magic.",
        },
    ]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hh))
    chats = [
        {
            "conversations": [
                {"from": "human", "value": "Say something kind."},
                {"from": "gpt", "value": "  "},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Say hello to me."},
                {"from": "gpt", "value": "Hello to you."},
            ]
        },
    ]
    (tmp_path / "chat.json").write_text(json.dumps(chats))
    sources = [
        {"name": "hh", "format": "hh", "uri": str(tmp_path / "hh.jsonl")},
        {"name": "chat", "format": "sharegpt", "uri": str(tmp_path / "chat.json")},
    ]
    manifest = run_data(
        tmp_path, sources, template="raw", min_tokens=0, dedup_threshold=None, eval_fraction=0
    )
    counts = manifest.metrics["sources"]
    assert [(counts[n]["dropped_empty"], counts[n]["kept"]) for n in ("hh", "chat")] == [
        (1, 1),
        (1, 1),
    ]
    pairs = (tmp_path / "out/pairs/train.jsonl").read_text()
    sft = (tmp_path / "out/sft/train.jsonl").read_text()
    assert "cats" not in pairs and "plants" in pairs
    assert "kind" not in sft and "Hello to you." in sft


def test_a_prompts_side_of_the_split_does_not_move_with_row_order_or_new_rows(tmp_path):
    """A prompt's side is a hash of the prompt: the file reversed gives the same eval
    prompts, and 10% more rows keep every earlier eval prompt in eval."""
    rows = [
        (f"Question number {n} on subject {n * 7 % 11}", f"Answer {n} " * 4) for n in range(200)
    ]

    def eval_prompts(name, listed):
        write_alpaca(tmp_path / "a.jsonl", listed)
        run_data(
            tmp_path / name,
            [{"name": "a", "format": "alpaca", "uri": str(tmp_path / "a.jsonl")}],
            template="raw",
            min_tokens=0,
            dedup_threshold=None,
            eval_fraction=0.1,
        )

        def read(split):
            text = (tmp_path / name / "out/prompts" / f"{split}.jsonl").read_text()
            return {json.loads(x)["prompt"] for x in text.splitlines()}

        return read("eval"), read("train")

    first, _ = eval_prompts("first", rows)
    reversed_, _ = eval_prompts("reversed", rows[::-1])
    grown, grown_train = eval_prompts(
        "grown", rows + [(f"Extra question {n} here", "Extra answer " * 4) for n in range(20)]
    )
    assert first and reversed_ == first
    assert first <= grown and not first & grown_train


def test_a_run_that_writes_no_rows_is_an_error_and_a_share_asked_is_at_least_one(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'pairs' needs a chosen and a rejected"):
        data.Config(
            output="o",
            sources=[{"name": "a", "format": "alpaca", "uri": "a.jsonl", "outputs": ["pairs"]}],
        )
    write_alpaca(
        tmp_path / "a.jsonl", [(f"Question {n} about things", "An answer " * 4) for n in range(9)]
    )
    manifest = run_data(
        tmp_path,
        [{"name": "a", "format": "alpaca", "uri": str(tmp_path / "a.jsonl")}],
        template="raw",
        min_tokens=0,
        dedup_threshold=None,
        eval_fraction=0.001,  # no prompt's point falls below it
    )
    assert manifest.metrics["eval_prompts"] == 1 and manifest.metrics["rows"]["prompts.eval"] == 1


def test_a_capped_hub_source_reads_only_the_rows_it_takes(tmp_path, monkeypatch):
    # A data set folder read through `hub:` as the Hub's are (load_dataset), two shards: the
    # second is corrupt, standing for the million rows a cap means not to fetch. Capped at
    # the first shard's rows, the source is streamed and the bad shard never read; whole,
    # the split is converted first and the bad shard is an error naming the data set.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing into the user's cache
    shards = tmp_path / "set" / "data"
    shards.mkdir(parents=True)
    rows = [
        {"instruction": f"name the colour number {i} of the rainbow", "input": "", "output": c}
        for i, c in enumerate(["red", "orange", "yellow", "green"])
    ]
    (shards / "train-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (shards / "train-00001.jsonl").write_text('{"instruction": "cut off here\n')
    source = {"name": "hub", "format": "alpaca", "hub": str(tmp_path / "set"), "max_rows": 4}
    options = {"template": "raw", "min_tokens": 0, "dedup_threshold": None, "eval_fraction": 0}

    manifest = run_data(tmp_path, [source], **options)

    assert manifest.metrics["sources"]["hub"]["read"] == 4
    written = (tmp_path / "out" / "sft" / "train.jsonl").read_text().splitlines()
    assert sorted(json.loads(r)["response"] for r in written) == sorted(r["output"] for r in rows)
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.arrow"))
    with pytest.raises(BadInputError, match=r"hf://.*set: cannot load split 'train'"):
        run_data(tmp_path / "whole", [{**source, "max_rows": None}], **options)
    # a sliced split, which streaming refuses, is loaded whole and then capped
    (shards / "train-00001.jsonl").unlink()
    sliced = {**source, "split": "train[:3]", "max_rows": 2}
    manifest = run_data(tmp_path / "sliced", [sliced], **options)
    assert manifest.metrics["sources"]["hub"]["read"] == 2
