"""Each reader on files in the real format of the data sets the seeds use."""

from __future__ import annotations

import pytest

from jobs.data.readers import Message, read_examples, rows_from_file
from jobs.data.templates import render_prompt
from jobs.errors import BadInputError
from tests.conftest import FIXTURES


def read(name: str, fmt: str, **options):
    path = FIXTURES / name
    return list(read_examples(rows_from_file(path, name), fmt, "src", **options))


def test_alpaca_keeps_instruction_input_and_output():
    examples = read("alpaca.jsonl", "alpaca")
    assert len(examples) == 3
    assert examples[0].messages == [Message("user", "Give three tips for staying healthy.")]
    assert examples[0].context is None
    assert examples[1].context == "The weather is lovely today."
    assert examples[1].response.startswith("Il fait très beau")


def test_kullm_json_array_with_korean_text():
    examples = read("kullm.json", "alpaca")
    assert [e.messages[0].content for e in examples] == [
        "건강을 유지하기 위한 세 가지 팁을 알려주세요.",
        "다음 문장을 영어로 번역하세요.",
    ]
    assert examples[1].context == "오늘 날씨가 정말 좋네요."


def test_dahoas_pairs_parse_the_dialogue_in_the_prompt():
    examples = read("dahoas_pairs.jsonl", "pairs")
    assert examples[0].messages == [Message("user", "What is a good way to learn to cook?")]
    assert examples[0].chosen.startswith("Start with simple recipes you enjoy")
    assert examples[0].rejected == "Just order takeout, cooking is a waste of time."
    assert [m.role for m in examples[1].messages] == ["user", "assistant", "user"]


def test_orca_pairs_from_parquet_keep_the_system_prompt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "system": "You are an AI assistant.",
            "question": "What is 2+2?",
            "chosen": "2+2 equals 4.",
            "rejected": "It is 5.",
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "orca.parquet")
    examples = list(
        read_examples(rows_from_file(tmp_path / "orca.parquet", "orca.parquet"), "pairs", "orca")
    )
    assert examples[0].messages == [
        Message("system", "You are an AI assistant."),
        Message("user", "What is 2+2?"),
    ]
    assert (examples[0].chosen, examples[0].rejected) == ("2+2 equals 4.", "It is 5.")


def test_hh_rlhf_splits_the_shared_dialogue_from_the_two_answers():
    examples = read("hh.jsonl", "hh")
    first = examples[0]
    assert [m.role for m in first.messages] == ["user", "assistant", "user"]
    assert first.messages[2].content == "What if they don't listen?"
    assert first.chosen.startswith("Then you might contact")
    assert first.rejected == "Break their speakers while they are out."


def test_sharegpt_takes_the_last_answer_and_the_source_label():
    examples = read("sharegpt.json", "sharegpt", label_field="model")
    assert [e.label for e in examples] == ["gpt-4", "gpt-3.5-turbo"]
    second = examples[1]
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.response.startswith("The capital of Italy is Rome")


def test_kullm_template_is_the_seeds_text():
    text = render_prompt("kullm", [Message("user", "안녕하세요")])
    assert text == (
        "아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
        "### 명령어:\n안녕하세요\n\n### 응답:\n"
    )
    assert "### 입력:\n맥락" in render_prompt("kullm", [Message("user", "질문")], context="맥락")
    # Stanford Alpaca's prompt (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
    assert render_prompt("alpaca", [Message("user", "Hi")]) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHi\n\n### Response:\n"
    )


def test_chat_template_comes_from_the_tokenizer(tiny):
    from jobs.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "model"))
    text = render_prompt("chat", [Message("user", "Hello")], tokenizer=tokenizer)
    assert text == "### User:\nHello\n\n### Assistant:\n"


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
            "alpaca",
            r"bad\.jsonl:2: not valid JSON",
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
            "alpaca",
            r"bad\.jsonl:2: field 'output' is missing or empty",
        ),
        ('{"prompt": "p", "chosen": "c"}\n', "pairs", r"bad\.jsonl:1: field 'rejected'"),
        (
            '{"chosen": "no markers", "rejected": "x"}\n',
            "hh",
            r"bad\.jsonl:1: field 'chosen' is not",
        ),
        (
            '{"instruction": 3, "output": "b"}\n',
            "alpaca",
            r"bad\.jsonl:1: field 'instruction' should be text",
        ),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path, content, fmt, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BadInputError, match=message):
        list(read_examples(rows_from_file(path, "bad.jsonl"), fmt, "s"))


ALPACA = [
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Count to two.", "input": "", "output": "One, two."},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_and_crlf_line_ends_read_as_plain_utf8(suffix, tmp_path):
    import csv
    import io
    import json

    if suffix == ".jsonl":
        text = "\r\n".join(json.dumps(row) for row in ALPACA) + "\r\n"
    elif suffix == ".json":
        text = json.dumps(ALPACA, indent=1).replace("\n", "\r\n")
    else:  # as a spreadsheet exports it: excel dialect, CRLF
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(ALPACA[0]))
        writer.writeheader()
        writer.writerows(ALPACA)
        text = buffer.getvalue()
    assert "\r\n" in text
    path = tmp_path / f"export{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))

    examples = list(read_examples(rows_from_file(path, path.name), "alpaca", "src"))
    assert [e.messages[0].content for e in examples] == ["Say hi.", "Count to two."]
    assert [e.response for e in examples] == ["Hi!", "One, two."]


def test_a_csv_row_with_a_missing_column_is_named(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("instruction,input,output\nSay hi.,,Hi!\nCount to two.,One\n")
    with pytest.raises(BadInputError, match=r"short\.csv:3: 3 columns"):
        list(rows_from_file(path, "short.csv"))


def test_an_hh_dialogue_with_crlf_splits_into_turns():
    from jobs.data.readers import parse_hh

    turns = parse_hh("\r\n\r\nHuman: Hi\r\n\r\nAssistant: Hello", "x.jsonl:1", "chosen")
    assert [(t.role, t.content) for t in turns] == [("user", "Hi"), ("assistant", "Hello")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(suffix, tmp_path):
    """A Latin-1 export: a clear error (exit 65) naming the file, line and byte, not a
    UnicodeDecodeError traceback that Kubernetes would retry."""
    HI, CAFE = (
        '{"instruction": "Say hi.", "output": "Hi!"}',
        '{"instruction": "Caf\xe9?", "output": "?"}',
    )
    text = {
        ".jsonl": f"{HI}\n{CAFE}\n",
        ".json": f"[\n{HI},\n{CAFE}]",
        ".csv": "instruction,input,output\nSay hi.,,Hi!\nCaf\xe9?,,Oui.\n",
    }[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(text.encode("latin-1"))
    line = {".jsonl": 2, ".json": 3, ".csv": 3}[suffix]
    with pytest.raises(BadInputError, match=rf"latin1\{suffix}:{line}: not UTF-8 text \(byte 0xe9"):
        list(rows_from_file(path, path.name))


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.json", "rows.json.gz", "rows.csv.gz"])
def test_compressed_files_and_json_lines_named_json_are_read(name, tmp_path):
    """What Hub data sets ship: gzip-compressed files, and JSON Lines under a .json name."""
    import csv
    import gzip
    import io
    import json

    if ".csv" in name:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(ALPACA[0]))
        writer.writeheader()
        writer.writerows(ALPACA)
        data = buffer.getvalue().encode()
    else:
        data = "".join(json.dumps(row) + "\n" for row in ALPACA).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    examples = list(read_examples(rows_from_file(path, name), "alpaca", "src"))
    assert [e.response for e in examples] == ["Hi!", "One, two."]


def test_a_broken_gzip_file_is_named(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(b'{"instruction": "not compressed"}\n')
    with pytest.raises(BadInputError, match=r"rows\.jsonl\.gz: not a readable gzip file"):
        list(rows_from_file(path, path.name))


def test_a_parquet_file_is_read_in_batches_to_its_last_row(tmp_path):
    """Streamed (batches of 1,024 rows), every row kept and numbered from 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Say {n}.", "output": str(n)} for n in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=700)
    read = list(rows_from_file(tmp_path / "big.parquet", "big.parquet"))
    assert [r.data for r in read] == rows
    assert read[-1].where == "big.parquet: row 2499"


def test_the_first_parquet_row_comes_without_the_whole_table_in_memory(tmp_path):
    """A data set of many GB is read a batch at a time: when its first row is handed on,
    Arrow holds a small share of the table (what reading it whole holds, measured in the
    same test, is the control)."""
    import gc

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Say {n}. " + "x" * 1000, "output": str(n)} for n in range(40000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1024)
    del rows
    gc.collect()
    before = pa.total_allocated_bytes()
    read = rows_from_file(path, path.name)
    assert next(read).data["output"] == "0"
    streamed = pa.total_allocated_bytes() - before
    read.close()
    gc.collect()
    before = pa.total_allocated_bytes()
    table = pq.read_table(path)
    whole = pa.total_allocated_bytes() - before
    assert table.num_rows == 40000 and whole > 40_000_000
    assert streamed < whole / 4, (streamed, whole)


def test_an_alpaca_input_of_spaces_is_no_input():
    from jobs.data.readers import Row, read_alpaca

    example = read_alpaca(
        Row("a.jsonl:1", {"instruction": "Hi?", "input": "  \n", "output": "Hi."}), "a"
    )
    assert example.context is None
    assert render_prompt("alpaca", example.messages, example.context).count("### Input") == 0


def test_an_empty_turn_inside_a_pairs_dialogue_keeps_the_turns_alternating():
    """An empty Assistant turn in the middle of the prompt stays a turn (dropping it would
    put two Human turns in a row, which Llama-2 and Mistral templates refuse)."""
    from jobs.data.readers import Row, read_pairs

    prompt = "\n\nHuman: Hi\n\nAssistant:\n\nHuman: Are you there?\n\nAssistant:"
    row = Row("p.jsonl:1", {"prompt": prompt, "chosen": "Yes.", "rejected": "No."})
    example = read_pairs(row, "p")
    assert [(m.role, m.content) for m in example.messages] == [
        ("user", "Hi"),
        ("assistant", ""),
        ("user", "Are you there?"),
    ]


def test_a_stage_written_row_is_named_with_its_folder(tmp_path):
    from jobs.batches import read_jsonl

    path = tmp_path / "pairs" / "train.jsonl"
    path.parent.mkdir()
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p"}\n')
    with pytest.raises(BadInputError, match=r"^pairs/train\.jsonl:2: field 'chosen' missing"):
        read_jsonl(path, ("prompt", "chosen", "rejected"))
