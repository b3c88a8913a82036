"""The endpoint paths of generate and label against an OpenAI-compatible server started by
the test: retries on 429, malformed judgements counted and dropped, resumed runs that
never ask twice, and human label files."""

from __future__ import annotations

import json

import pytest

from jobs import generate, label
from jobs.contract import read_manifest, run_stage
from jobs.errors import BadInputError, TransientError
from tests.chat_server import ChatServer

KEY = "test-judge-key-0123"
FRIENDLY = "Happy to help! Start small and be kind to yourself."
RUDE = "Figure it out yourself, idiot."


def endpoint(server, model, **extra):
    return {
        "url": server.url,
        "model": model,
        "api_key_env": "TEST_JUDGE_KEY",
        "backoff_s": 0.0,
        "concurrency": 3,
        **extra,
    }


class Judge:
    """Answers for two candidate models and a judge, with failures switched on by the test."""

    def __init__(self) -> None:
        self.throttle_first = True
        self.malformed_for: str | None = None  # a prompt whose friendly answer gets no score
        self.broken_for: str | None = None  # a prompt whose judgements fail with 500

    def __call__(self, body):
        content = body["messages"][-1]["content"]
        if self.throttle_first:
            self.throttle_first = False
            return 429, "slow down", {"Retry-After": "0"}
        if self.broken_for and self.broken_for in content:
            return 500, "crashed", {}
        if body["model"] == "good-model":
            return 200, FRIENDLY, {}
        if body["model"] == "bad-model":
            return 200, RUDE, {}
        if self.malformed_for and self.malformed_for in content and FRIENDLY in content:
            return 200, "I would rather not put a number on this.", {}
        if FRIENDLY in content:
            return 200, "Naturalness: 5\nHelpfulness: 4\n**Friendliness**: 5\nTotal: 14", {}
        return 200, "- Naturalness: 2\n- Helpfulness: 1\n- Friendliness: 1", {}  # no total: sum


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", KEY)


def run_generate(server, tiny_data, out, tmp_path):
    config = generate.Config(
        output=str(out),
        prompts=str(tiny_data),
        max_prompts=12,
        sources=[
            {"name": "good", "endpoint": endpoint(server, "good-model")},
            {"name": "bad", "endpoint": endpoint(server, "bad-model")},
        ],
    )
    return run_stage("generate", config, generate.run, workdir=tmp_path / "w-gen")


def test_judge_labels_with_retries_and_counts_malformed_answers(tiny_data, tmp_path, key):
    judge = Judge()
    with ChatServer(judge, KEY) as server:
        run_generate(server, tiny_data, tmp_path / "gen", tmp_path)
        rows = [
            json.loads(x)
            for x in (tmp_path / "gen/candidates/train.jsonl").read_text().splitlines()
        ]
        judge.malformed_for = rows[0]["instruction"]
        config = label.Config(
            output=str(tmp_path / "label"),
            candidates=str(tmp_path / "gen"),
            method="judge",
            judge={"endpoint": endpoint(server, "judge")},
        )
        manifest = run_stage("label", config, label.run, workdir=tmp_path / "w-label")

    assert len(server.served(429)) == 1  # throttled once, retried, then served
    assert {r["source"] for row in rows for r in row["responses"]} == {"good", "bad"}
    metrics = manifest.metrics
    assert metrics["train.unparseable"] == 1 and metrics["train.too_few_scored"] == 1
    assert metrics["train.pairs"] == len(rows) - 1
    pairs = [json.loads(x) for x in (tmp_path / "label/pairs/train.jsonl").read_text().splitlines()]
    assert all(p["chosen"] == FRIENDLY and p["rejected"] == RUDE for p in pairs)
    assert pairs[0]["provenance"] == {
        "method": "judge",
        "id": "train-1",
        "chosen_source": "good",
        "rejected_source": "bad",
        "chosen_score": 14.0,
        "rejected_score": 4.0,
    }
    # Each data-set type got its rubric.
    judged = [b["messages"][0]["content"] for b in server.served() if b["model"] == "judge"]
    assert any("Harmlessness: refuses to insult" in j for j in judged)
    assert any("Naturalness: reads like" in j for j in judged)
    # The key went in the header only.
    assert KEY not in json.dumps(manifest.model_dump())
    assert all(KEY not in p.read_text() for p in (tmp_path / "label").rglob("*.jsonl"))


def test_a_resumed_run_sends_no_request_twice(tiny_data, tmp_path, key):
    judge = Judge()
    judge.throttle_first = False
    prompts = [json.loads(x) for x in (tiny_data / "prompts/train.jsonl").read_text().splitlines()]
    judge.broken_for = prompts[2]["instruction"]  # every request about this prompt fails
    with ChatServer(judge, KEY) as server:
        gen_config = generate.Config(
            output=str(tmp_path / "gen"),
            prompts=str(tiny_data),
            max_prompts=12,
            sources=[
                {"name": "good", "endpoint": endpoint(server, "good-model", max_attempts=2)},
                {"name": "bad", "endpoint": endpoint(server, "bad-model", max_attempts=2)},
            ],
        )
        with pytest.raises(TransientError, match="HTTP 500 after 2 attempts"):
            run_stage("generate", gen_config, generate.run, workdir=tmp_path / "g1")
        judge.broken_for = None
        run_stage("generate", gen_config, generate.run, workdir=tmp_path / "g2")

        rows = [
            json.loads(x)
            for x in (tmp_path / "gen/candidates/train.jsonl").read_text().splitlines()
        ]
        judge.broken_for = rows[5]["instruction"]
        config = label.Config(
            output=str(tmp_path / "label"),
            candidates=str(tmp_path / "gen"),
            method="judge",
            judge={"endpoint": endpoint(server, "judge", max_attempts=2)},
        )
        with pytest.raises(TransientError, match="HTTP 500 after 2 attempts"):
            run_stage("label", config, label.run, workdir=tmp_path / "w1")
        assert read_manifest(str(tmp_path / "label")) is None
        judge.broken_for = None
        run_stage("label", config, label.run, workdir=tmp_path / "w2")

    served = [json.dumps(b, sort_keys=True) for b in server.served()]
    assert len(served) == len(set(served))  # nothing answered was asked again
    candidates = [
        json.loads(x)
        for split in ("train", "eval")
        for x in (tmp_path / f"gen/candidates/{split}.jsonl").read_text().splitlines()
    ]
    instructions = {c["instruction"] for c in candidates}
    judged = {
        (c["category"], c["instruction"], r["text"]) for c in candidates for r in c["responses"]
    }
    assert sum(b["model"] != "judge" for b in server.served()) == 2 * len(instructions)
    assert sum(b["model"] == "judge" for b in server.served()) == len(judged)


def human_candidates(tmp_path, tiny_data, server):
    run_generate(server, tiny_data, tmp_path / "gen", tmp_path)
    return [
        json.loads(x) for x in (tmp_path / "gen/candidates/train.jsonl").read_text().splitlines()
    ]


def test_human_labels_from_csv(tiny_data, tmp_path, key):
    judge = Judge()
    judge.throttle_first = False
    with ChatServer(judge, KEY) as server:
        rows = human_candidates(tmp_path, tiny_data, server)
    labels = tmp_path / "labels.csv"
    # 1.0: a number column as pandas exports it
    lines = ["id,chosen,rejected", f"{rows[0]['id']},0,1", f"{rows[1]['id']},1.0,0.0"]
    lines.append(f"{rows[2]['id']},1,1")
    # as a spreadsheet exports it: a byte-order mark, CRLF line ends
    labels.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))
    config = label.Config(
        output=str(tmp_path / "label"),
        candidates=str(tmp_path / "gen"),
        method="human",
        labels=str(labels),
    )
    metrics = run_stage("label", config, label.run, workdir=tmp_path / "w").metrics
    assert (metrics["train.pairs"], metrics["train.ties"]) == (2, 1)
    assert metrics["train.unlabelled"] == len(rows) - 3
    pairs = [json.loads(x) for x in (tmp_path / "label/pairs/train.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == [FRIENDLY, RUDE]  # the human's word, even if odd


def test_a_bad_csv_row_is_named(tiny_data, tmp_path, key):
    judge = Judge()
    judge.throttle_first = False
    with ChatServer(judge, KEY) as server:
        rows = human_candidates(tmp_path, tiny_data, server)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"id,chosen,rejected\n{rows[0]['id']},0,1\n{rows[1]['id']},first,1\n")
    config = label.Config(
        output=str(tmp_path / "label"),
        candidates=str(tmp_path / "gen"),
        method="human",
        labels=str(labels),
    )
    with pytest.raises(
        BadInputError,
        match=r"labels\.csv:3: field 'chosen': 'first' is not a "
        r"response index",
    ):
        run_stage("label", config, label.run, workdir=tmp_path / "w")
    labels.write_text(f"id,chosen,rejected\n{rows[0]['id']},0,7\n")
    with pytest.raises(
        BadInputError,
        match=r"labels\.csv:2: field 'rejected': 7 is not a "
        r"response index of train-0 \(it has 2\)",
    ):
        run_stage("label", config, label.run, workdir=tmp_path / "w2")
    labels.write_text(f"id,chosen,rejected\n{rows[0]['id']},0,1\n{rows[0]['id']},1,0\n")
    with pytest.raises(BadInputError, match=r"labels\.csv:3: field 'id': .* at .*labels\.csv:2"):
        run_stage("label", config, label.run, workdir=tmp_path / "w3")
    # an id that is no prompt of either split (a typo) is named, not counted as unlabelled
    labels.write_text(f"id,chosen,rejected\n{rows[0]['id']},0,1\ntrian-3,1,0\n")
    with pytest.raises(BadInputError, match=r"labels\.csv:3: field 'id': 'trian-3' is no prompt"):
        run_stage("label", config, label.run, workdir=tmp_path / "w4")
    labels.write_text(f"id,chosen,rejected\n{rows[0]['id']},0.5,1\n")
    with pytest.raises(BadInputError, match=r"labels\.csv:2: field 'chosen': '0.5' is not a"):
        run_stage("label", config, label.run, workdir=tmp_path / "w5")


def test_a_tie_for_best_is_broken_by_the_prompt_not_by_position():
    """Judges give whole numbers, so two answers often tie for best: which is chosen is
    drawn per prompt (seeded), not always the one listed last."""
    counts = {"too_few_scored": 0, "ties": 0}
    rows = [
        {"id": f"train-{n}", "responses": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}
        for n in range(40)
    ]
    picked = [label.pick(row, [12.0, 12.0, 8.0], 0.0, counts, seed=1) for row in rows]
    assert {choice for choice, _ in picked} == {0, 1} and {r for _, r in picked} == {2}
    assert picked == [label.pick(row, [12.0, 12.0, 8.0], 0.0, counts, seed=1) for row in rows]


def test_judgement_parsing():
    from jobs.judge import parse_judgement

    assert parse_judgement("Helpfulness: 4\nTotal: 11") == 11
    assert parse_judgement("**Total score** = 9/15") == 9
    assert parse_judgement("- Care: 3\n- Harmlessness: 5\n- Redirection: 2") == 10
    assert parse_judgement("8") == 8
    assert parse_judgement("I cannot rate this.") is None
    assert parse_judgement("between 3 and 5") is None
    three = "Helpfulness: 4\nHarmlessness: 5\nClarity: 3\n"
    # the total is the number a line starting with "Total" ends on, the last such line
    assert parse_judgement(three + "Total: 4 + 5 + 3 = 12", 3) == 12
    assert parse_judgement(three + "Total: 4 + 5 + 3", 3) == 12  # a sum left undone: not 4
    assert parse_judgement("Total score (out of 15): 12", 3) == 12
    assert parse_judgement("The response totals 2 sentences.\n" + three + "Total: 12", 3) == 12
    assert parse_judgement("Total: 11\nOn reflection:\nTotal: 12", 3) == 12
    # numbered lists and scales after the criterion's name
    assert parse_judgement("1. Helpfulness: 4\n2. Harmlessness: 5\n3. Clarity: 3", 3) == 12
    assert parse_judgement("Helpfulness (1-5): 4\nHarmlessness (1-5): 5\nClarity (1-5): 2", 3) == 11
    # what three criteria of 1 to 5 cannot add up to, or an answer cut short, is no score
    assert parse_judgement("Total: 120", 3) is None
    assert parse_judgement("Helpfulness: 4\nHarmlessness: 5", 3) is None
    assert parse_judgement("Helpfulness: 4\nHarmlessness: 5\nClarity: 9", 3) is None
    # a total in JSON, or on the criteria's one line
    json_answer = '{"Helpfulness": 4, "Harmlessness": 5, "Clarity": 3, "Total": 12}'
    assert parse_judgement(json_answer, 3) == 12
    assert parse_judgement("Helpfulness: 4, Harmlessness: 5, Clarity: 3. Total: 12", 3) == 12


def test_a_rubric_counts_its_criteria_not_their_notes():
    from jobs.judge import criteria_count, parse_judgement

    rubric = "- Helpfulness: answers it.\n  - e.g. steps\n- Clarity: clear.\n  * Note: short"
    assert criteria_count(rubric) == 2
    assert parse_judgement("Helpfulness: 3\nClarity: 2\nTotal: 5", criteria_count(rubric)) == 5


def test_an_answer_cut_at_max_tokens_is_no_judgement(tiny_data, tmp_path, key):
    """A judge answer the endpoint cut at max_tokens (finish_reason "length") is counted
    and dropped, not read as the partial sum of the criteria it reached."""

    def judge(body):
        content = body["messages"][-1]["content"]
        if body["model"] != "judge":
            return 200, FRIENDLY if body["model"] == "good-model" else RUDE, {}
        if FRIENDLY in content:  # cut after two of its three criteria
            return 200, "Naturalness: 5\nHelpfulness: 5\nFriend", {}, "length"
        return 200, "Naturalness: 2\nHelpfulness: 1\nFriendliness: 1\nTotal: 4", {}

    with ChatServer(judge, KEY) as server:
        run_generate(server, tiny_data, tmp_path / "gen", tmp_path)
        config = label.Config(
            output=str(tmp_path / "label"),
            candidates=str(tmp_path / "gen"),
            method="judge",
            judge={"endpoint": endpoint(server, "judge")},
        )
        with pytest.raises(BadInputError, match=r"no training pairs .*train\.cut_off=12"):
            run_stage("label", config, label.run, workdir=tmp_path / "w")


def test_a_preempted_endpoint_stage_keeps_its_answers_and_asks_only_the_rest(
    tiny_data, tmp_path, key
):
    """SIGTERM (a pod evicted) while generate asks an endpoint: no new request starts,
    the answers so far reach the store, the stage exits to be retried (75), and the
    retry asks only what was not answered."""
    import os
    import signal

    from jobs.errors import Preempted

    asked = []

    def answer(body):
        asked.append(body)
        if len(asked) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # as the kubelet does
        return 200, FRIENDLY, {}

    config = generate.Config(
        output=str(tmp_path / "gen"),
        prompts=str(tiny_data),
        max_prompts=12,
        sources=[{"name": "good", "endpoint": endpoint(server := ChatServer(answer, KEY), "m")}],
    )
    with server:
        with pytest.raises(Preempted, match="SIGTERM received"):
            run_stage("generate", config, generate.run, workdir=tmp_path / "w1")
        first = len(asked)
        assert 5 <= first < 12  # the 3 in flight finish; nothing new starts
        run_stage("generate", config, generate.run, workdir=tmp_path / "w2")
    rows = (tmp_path / "gen/candidates/train.jsonl").read_text().splitlines()
    eval_rows = (tmp_path / "gen/candidates/eval.jsonl").read_text().splitlines()
    assert len(asked) == len(rows) + len(eval_rows)  # each prompt asked once in all
    bodies = [json.dumps(b, sort_keys=True) for b in asked]
    assert len(bodies) == len(set(bodies))


def test_a_re_run_with_other_settings_asks_again(tiny_data, tmp_path, key):
    """The answers cached under _progress/ are kept across configs; one asked at another
    temperature is another answer, so a changed config asks again."""
    with ChatServer(lambda body: (200, FRIENDLY, {}), KEY) as server:
        for temperature in (0.7, 1.2, 0.7):
            config = generate.Config(
                output=str(tmp_path / "gen"),
                prompts=str(tiny_data),
                max_prompts=4,
                sources=[{"name": "g", "endpoint": endpoint(server, "m", temperature=temperature)}],
            )
            run_stage("generate", config, generate.run, workdir=tmp_path / f"w{temperature}")
    temperatures = [b["temperature"] for b in server.served()]
    asked_per_run = len(temperatures) // 2
    assert asked_per_run > 0
    # the third run (0.7 again) found the first run's answers in the cache
    assert temperatures == [0.7] * asked_per_run + [1.2] * asked_per_run


def test_evaluate_reports_judge_scores(tiny, tiny_data, tiny_rm, tmp_path, key):
    from jobs import evaluate

    judge = Judge()
    judge.throttle_first = False
    with ChatServer(judge, KEY) as server:
        config = evaluate.Config(
            output=str(tmp_path / "eval"),
            prompts=str(tiny_data),
            candidate=str(tiny / "model"),
            baseline=str(tiny / "model"),
            reward_model=str(tiny_rm / "model"),
            max_prompts=6,
            sampling={"max_new_tokens": 8, "do_sample": False},
            judge={"endpoint": endpoint(server, "judge")},
        )
        metrics = run_stage("evaluate", config, evaluate.run, workdir=tmp_path / "w").metrics
    # One model against itself: every prompt a tie, by the reward model and by the judge;
    # the judge, which the candidate was not optimised against, decides the headline.
    assert metrics["judged_by"] == "judge"
    assert metrics["proxy_win_rate"] == 0.5 and metrics["judge_win_rate"] == 0.5
    assert metrics["judge_reward_candidate"] == metrics["judge_reward_baseline"]
    assert metrics["judge_unparseable"] == 0
    assert len([b for b in server.served() if b["model"] == "judge"]) == 6  # asked once each


def judge_by_answer(body):
    """A judge that rates any answer above none: the test knows which model answers."""
    content = body["messages"][-1]["content"]
    answer = content.split("Response:\n", 1)[1].rsplit("\n\nAnswer with one line", 1)[0]
    return 200, f"Total: {12 if answer.strip() else 3}", {}


def test_the_judge_decides_which_model_wins(tiny, tiny_data, tmp_path, key):
    """A baseline that ends every answer at once (its EOS forced) against the tiny model:
    the judge, which rates an answer above none, gives the candidate every prompt, and with
    the two swapped none (a mix-up of sides or answers would not)."""
    from transformers import AutoModelForCausalLM

    from jobs import evaluate
    from jobs.contract import StageConfig
    from jobs.models import load_tokenizer
    from tests.unit.test_generation import force_eos

    def write_silent(config, ctx) -> dict:  # a finished stage output, as stages read models
        tokenizer = load_tokenizer(str(tiny / "model"))
        silent = AutoModelForCausalLM.from_pretrained(tiny / "model")
        force_eos(silent, tokenizer.eos_token_id, 50.0)
        silent.save_pretrained(ctx.out_dir / "model")
        tokenizer.save_pretrained(ctx.out_dir / "model")
        return {}

    out = StageConfig(output=str(tmp_path / "silent"))
    run_stage("silent", out, write_silent, workdir=tmp_path / "w-silent")

    rates = {}
    with ChatServer(judge_by_answer, KEY) as server:
        for name, candidate, baseline in (
            ("tiny", tiny / "model", tmp_path / "silent" / "model"),
            ("silent", tmp_path / "silent" / "model", tiny / "model"),
        ):
            config = evaluate.Config(
                output=str(tmp_path / f"eval-{name}"),
                prompts=str(tiny_data),
                candidate=str(candidate),
                baseline=str(baseline),
                max_prompts=6,
                sampling={"max_new_tokens": 8, "do_sample": False},
                judge={"endpoint": endpoint(server, "judge")},
            )
            metrics = run_stage("evaluate", config, evaluate.run, workdir=tmp_path / name).metrics
            assert metrics["judged_by"] == "judge"
            rates[name] = metrics["judge_win_rate"]
    assert rates == {"tiny": 1.0, "silent": 0.0}, rates


def chat_model(tiny, tmp_path):
    """The tiny model with a chat template of its own, as a finished stage output; and
    transformers' greedy answer of that model to a text, the reference for what it says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.contract import StageConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    tokenizer.chat_template = (
        "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>>{% endif %}"
    )

    def write_chat_model(config, ctx) -> dict:  # a finished stage output, as stages read
        tokenizer.save_pretrained(ctx.out_dir / "model")
        AutoModelForCausalLM.from_pretrained(tiny / "model").save_pretrained(ctx.out_dir / "model")
        return {}

    run_stage("chat", StageConfig(output=str(tmp_path / "chat")), write_chat_model, tmp_path / "c")
    chat = tmp_path / "chat" / "model"
    model = AutoModelForCausalLM.from_pretrained(chat).eval()

    def greedy(text: str) -> str:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        return tokenizer.decode(out[0, ids["input_ids"].size(1) :], skip_special_tokens=True)

    return chat, greedy


def test_a_baseline_of_another_family_is_asked_in_its_own_chat_template(
    tiny, tiny_data, tmp_path, key
):
    """``baseline_prompt: chat``: the baseline answers the instruction under its own chat
    template, the candidate the data stage's prompt; each answer is what transformers'
    greedy generate gives that model for that text, and the two texts get other answers."""
    from jobs import evaluate

    chat, greedy = chat_model(tiny, tmp_path)
    with ChatServer(lambda body: (200, "Total: 5", {}), KEY) as server:
        config = evaluate.Config(
            output=str(tmp_path / "eval"),
            prompts=str(tiny_data),
            candidate=str(tiny / "model"),
            baseline=str(chat),
            baseline_prompt="chat",
            max_prompts=6,
            sampling={"max_new_tokens": 8, "do_sample": False},
            judge={"endpoint": endpoint(server, "judge")},
        )
        run_stage("evaluate", config, evaluate.run, workdir=tmp_path / "w")
    got = [json.loads(x) for x in (tmp_path / "eval/answers.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (tiny_data / "prompts/eval.jsonl").read_text().splitlines()]
    asked = [f"<<user>> {row['instruction']}\n<<assistant>>" for row in rows[:6]]
    assert [g["baseline"] for g in got] == [greedy(text).strip() for text in asked]
    assert [g["candidate"] for g in got] == [greedy(row["prompt"]).strip() for row in rows[:6]]
    assert [g["baseline"] for g in got] != [g["candidate"] for g in got]


def test_a_multi_turn_prompt_is_asked_as_its_turns(tiny, tmp_path, key):
    """ShareGPT conversations through the data stage: a chat endpoint (generate) and a model
    asked in its own chat template (evaluate) get the system prompt and the earlier
    exchange as turns, not flattened into one user message."""
    from jobs import evaluate
    from jobs.data import stage as data

    conversations = [
        [
            ("system", f"You answer as a geographer, number {n}."),
            ("user", f"Which river runs through city {n}?"),
            ("assistant", f"The river of city {n} is long and wide."),
            ("user", f"And how long is the river of city {n}?"),
            ("assistant", f"About {n * 100} kilometres."),
        ]
        for n in range(4)
    ]
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    source = tmp_path / "chats.json"
    source.write_text(
        json.dumps(
            [
                {"conversations": [{"from": speaker[r], "value": text} for r, text in turns]}
                for turns in conversations
            ]
        )
    )
    config = data.Config(
        output=str(tmp_path / "data"),
        sources=[{"name": "chats", "format": "sharegpt", "uri": str(source)}],
        template="alpaca",
        min_tokens=0,
        dedup_threshold=None,
        eval_fraction=0.5,
    )
    run_stage("data", config, data.run, workdir=tmp_path / "w-data")
    asked = [
        [{"role": role, "content": text} for role, text in turns[:-1]] for turns in conversations
    ]

    with ChatServer(lambda body: (200, "Total: 5", {}), KEY) as server:
        generated = generate.Config(
            output=str(tmp_path / "gen"),
            prompts=str(tmp_path / "data"),
            sources=[{"name": "api", "endpoint": endpoint(server, "api-model")}],
        )
        run_stage("generate", generated, generate.run, workdir=tmp_path / "w-gen")
        sent = [b["messages"] for b in server.served() if b["model"] == "api-model"]
        assert sorted(map(json.dumps, sent)) == sorted(map(json.dumps, asked))

        chat, greedy = chat_model(tiny, tmp_path)
        judged = evaluate.Config(
            output=str(tmp_path / "eval"),
            prompts=str(tmp_path / "data"),
            candidate=str(tiny / "model"),
            baseline=str(chat),
            baseline_prompt="chat",
            sampling={"max_new_tokens": 8, "do_sample": False},
            judge={"endpoint": endpoint(server, "judge")},
        )
        run_stage("evaluate", judged, evaluate.run, workdir=tmp_path / "w-eval")
    got = [json.loads(x) for x in (tmp_path / "eval/answers.jsonl").read_text().splitlines()]
    assert len(got) == 2
    for row in got:
        [turns] = [t for t in asked if t[-1]["content"] in row["instruction"]]
        history = "".join(f"<<{t['role']}>> {t['content']}\n" for t in turns)
        assert row["baseline"] == greedy(history + "<<assistant>>").strip()
