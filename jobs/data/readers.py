"""Readers for the data formats the seeds use, into one record shape.

Each reader takes rows (dicts) with their location and yields :class:`Example`.
A bad row raises :class:`BadInputError` naming the file, the row (JSONL line
number, or row index for JSON arrays, Parquet and Hub data sets) and the field.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import BadInputError


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Example:
    """One training example: a prompt conversation and what may follow it."""

    source: str
    messages: list[Message]  # the conversation up to (not including) the final response
    context: str | None = None  # Alpaca/KULLM "input", kept apart for the templates with one
    response: str | None = None  # for SFT
    chosen: str | None = None  # for preference pairs
    rejected: str | None = None
    label: str | None = None  # the source class (C-RLFT), e.g. "gpt4"
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # the row it came from ("file.jsonl:12"), for error messages

    @property
    def outputs(self) -> list[str]:
        return [r for r in (self.response, self.chosen, self.rejected) if r is not None]


@dataclass(frozen=True)
class Row:
    where: str  # "file.jsonl:12" or "file.parquet: row 3", for error messages
    data: dict[str, Any]
    # a source's ``columns``: the format's field -> the data set's column it was read from
    columns: dict[str, str] = field(default_factory=dict)

    def field_name(self, name: str) -> str:
        """How an error names a field: the data set's column, which the user can find."""
        if name in self.columns:
            return f"{self.columns[name]!r} (read as {name!r})"
        return repr(name)

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.data.get(name)
        if value is None or (isinstance(value, str) and not value.strip() and required):
            if required:
                raise BadInputError(
                    f"{self.where}: field {self.field_name(name)} is missing or empty"
                )
            return None
        if not isinstance(value, str):
            raise BadInputError(
                f"{self.where}: field {self.field_name(name)} should be text, "
                f"got {type(value).__name__}"
            )
        return value


# --- row sources --------------------------------------------------------------------------


def _not_utf8(display: str, line: int, raw: bytes, exc: UnicodeDecodeError) -> BadInputError:
    return BadInputError(
        f"{display}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
        f"{exc.start + 1}); save the file as UTF-8"
    )


def _text_lines(path: Path, display: str) -> Iterator[tuple[int, str]]:
    """The numbered lines of a UTF-8 text file (gzip-compressed where it ends in .gz), a
    line that is not UTF-8 named by its number. The first may start with a byte-order mark
    and lines may end with CRLF, as Windows tools and spreadsheet exports write them."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(display, number, raw, exc) from None
                yield number, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise BadInputError(f"{display}: not a readable gzip file ({exc})") from None


def rows_from_file(path: Path, display: str) -> Iterator[Row]:
    """Rows of a JSONL, JSON (an array of objects, or JSON Lines under a .json name as Hub
    data sets often have), CSV (a header row) or Parquet file; the text formats may be
    gzip-compressed (``.jsonl.gz``). Rows are read as they are asked for, so a large file
    is never held whole (a JSON array is: the format has no rows before it is parsed)."""
    kind = Path(path.name.lower().removesuffix(".gz")).suffix
    if kind == ".parquet":
        yield from _parquet_rows(path, display)
    elif kind == ".csv":
        lines = _text_lines(path, display)
        reader = csv.DictReader(line for _, line in lines)
        for item in reader:
            if None in item or None in item.values():
                raise BadInputError(
                    f"{display}:{reader.line_num}: {len(reader.fieldnames or [])} columns "
                    "in the header and a different number in this row"
                )
            yield Row(f"{display}:{reader.line_num}", item)
    elif kind == ".json":
        text = "".join(line for _, line in _text_lines(path, display))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data" and text.lstrip().startswith("{"):
                yield from _jsonl_rows(path, display)  # JSON Lines under a .json name
                return
            raise BadInputError(
                f"{display}: line {exc.lineno}: not valid JSON ({exc.msg})"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise BadInputError(f"{display}: expected a JSON array of objects")
        for index, item in enumerate(data):
            yield _as_row(f"{display}: row {index}", item)
    else:
        yield from _jsonl_rows(path, display)


def _jsonl_rows(path: Path, display: str) -> Iterator[Row]:
    for number, line in _text_lines(path, display):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(
                f"{display}:{number}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        yield _as_row(f"{display}:{number}", item)


def _parquet_rows(path: Path, display: str) -> Iterator[Row]:
    """A Parquet file's rows, a batch at a time (not the whole table in memory)."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for data in batch.to_pylist():
                yield Row(f"{display}: row {index}", data)
                index += 1
    except BadInputError:
        raise
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise BadInputError(f"{display}: not a readable Parquet file ({exc})") from None


def rows_from_hub(
    name: str, subset: str | None, split: str, revision: str | None, stream: bool = False
) -> Iterator[Row]:
    """Rows of a Hugging Face Hub data set (what users run; tests use a local data set
    folder, which ``load_dataset`` reads the same way). ``stream``: read the rows as they
    are taken, for a source capped by ``max_rows`` (the first thousand rows of a
    million-row set download and parse only the files they are in, and nothing is written
    to the data sets cache). Not for a sliced split (``train[:10%]``, which streaming
    refuses) nor offline (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``: only the cache a
    whole load made can serve it); otherwise the whole split is downloaded and converted
    first, as ``load_dataset`` does."""
    import datasets

    stream = stream and "[" not in split and not _offline()
    where, index = f"hf://{name}", -1
    try:
        dataset = datasets.load_dataset(
            name, subset, split=split, revision=revision, streaming=stream
        )
        # a streamed set reads its files only when iterated: its errors come from here
        for index, data in enumerate(dataset):
            yield Row(f"{where}[{split}]: row {index}", data)
    except BadInputError:
        raise
    except Exception as exc:  # the hub client raises many types; the user needs the message
        after = f" after row {index}" if index >= 0 else ""
        raise BadInputError(f"{where}: cannot load split {split!r}{after} ({exc})") from None


def _offline() -> bool:
    flags = (os.environ.get(n, "") for n in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _as_row(where: str, item: Any) -> Row:
    if not isinstance(item, dict):
        raise BadInputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return Row(where, item)


# --- formats ------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh(text: str, where: str, name: str) -> list[Message]:
    """Split an Anthropic HH-RLHF dialogue ("\\n\\nHuman: ... \\n\\nAssistant: ...") into turns."""
    text = text.replace("\r\n", "\n")  # a dialogue exported on Windows
    if not text.startswith("\n\nHuman:") and text.startswith("Human:"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise BadInputError(
            f"{where}: field {name!r} is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogue"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [Message(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def read_alpaca(row: Row, source: str) -> Example:
    """Alpaca / KULLM: instruction, optional input, output."""
    instruction = row.text("instruction")
    context = row.text("input", required=False)
    context = context if context and context.strip() else None  # " " is no input either
    return Example(
        source, [Message("user", instruction)], context=context, response=row.text("output")
    )


def read_pairs(row: Row, source: str) -> Example:
    """prompt/chosen/rejected (Dahoas, DeepSpeed-Chat) or system/question/chosen/rejected (orca)."""
    name = "prompt" if row.data.get("prompt") not in (None, "") else "question"
    prompt = row.data.get(name)
    if prompt is not None and not isinstance(prompt, str):
        raise BadInputError(f"{row.where}: field {name!r} should be text")
    if prompt is None or not prompt.strip():  # whitespace alone is no question either
        raise BadInputError(f"{row.where}: field 'prompt' (or 'question') is missing or empty")
    messages: list[Message] = []
    if system := (row.text("system", required=False) or "").strip():
        messages.append(Message("system", system))
    if "\n\nHuman:" in prompt or prompt.startswith("Human:"):
        turns = parse_hh(
            prompt.rstrip().removesuffix("Assistant:").rstrip() + "\n\nAssistant: ",
            row.where,
            "prompt",
        )
        messages += turns[:-1]  # all but the empty Assistant cue: the roles keep alternating
    else:
        messages.append(Message("user", prompt.strip()))
    return Example(
        source, messages, chosen=row.text("chosen").strip(), rejected=row.text("rejected").strip()
    )


def read_hh(row: Row, source: str) -> Example:
    """Anthropic HH-RLHF: two full dialogues sharing every turn but the last answer."""
    chosen = parse_hh(row.text("chosen"), row.where, "chosen")
    rejected = parse_hh(row.text("rejected"), row.where, "rejected")
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        raise BadInputError(
            f"{row.where}: field 'chosen'/'rejected' must end with an Assistant turn"
        )
    if chosen[:-1] != rejected[:-1]:
        raise BadInputError(
            f"{row.where}: field 'rejected' does not share the dialogue of 'chosen'"
        )
    return Example(source, chosen[:-1], chosen=chosen[-1].content, rejected=rejected[-1].content)


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "system": "system",
}


def read_sharegpt(row: Row, source: str, label_field: str | None = None) -> Example:
    """ShareGPT conversations (``conversations`` of from/value turns) or OpenAI messages
    (``messages`` of role/content turns); the last assistant turn is the response, the
    turns before it the prompt (every assistant turn among them is trained under a chat
    template)."""
    name = next(
        (n for n in ("conversations", "items", "messages") if n in row.data), "conversations"
    )
    turns = row.data.get(name)
    if not isinstance(turns, list) or not turns:
        raise BadInputError(
            f"{row.where}: field 'conversations' (or 'messages') is missing or empty"
        )
    speaker, text = ("role", "content") if name == "messages" else ("from", "value")
    messages = []
    for index, turn in enumerate(turns):
        who = turn.get(speaker) if isinstance(turn, dict) else None
        role = _SHAREGPT_ROLES.get(str(who).lower())
        if role is None or not isinstance(turn.get(text), str):
            raise BadInputError(
                f"{row.where}: field '{name}[{index}]' needs '{speaker}' "
                f"(user/assistant/system) and text '{text}'"
            )
        messages.append(Message(role, turn[text].strip()))
    while messages and messages[-1].role != "assistant":
        messages.pop()
    if len(messages) < 2:
        raise BadInputError(f"{row.where}: field 'conversations' has no assistant answer")
    label = None
    if label_field is not None:
        label = row.text(label_field)
    return Example(source, messages[:-1], response=messages[-1].content, label=label)


READERS: dict[str, Callable[..., Example]] = {
    "alpaca": read_alpaca,
    "pairs": read_pairs,
    "hh": read_hh,
    "sharegpt": read_sharegpt,
}


def read_examples(rows: Iterable[Row], fmt: str, source: str, **options: Any) -> Iterator[Example]:
    reader = READERS[fmt]
    for row in rows:
        example = reader(row, source, **options)
        example.where = row.where
        yield example
