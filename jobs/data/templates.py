"""Prompt templates: the seed's KULLM preset, the Alpaca preset, and the tokenizer's own.

A template turns a prompt conversation into the exact text the model sees
before its response; the response follows it directly and ends with EOS. Under the
tokenizer's own chat template a whole conversation is also written as pieces
(:func:`chat_segments`), so that SFT trains every assistant turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jobs.data.readers import Message


@dataclass(frozen=True)
class Preset:
    plain: str  # with {prompt}
    with_input: str  # with {prompt} and {input}


PRESETS: dict[str, Preset] = {
    # The seed's KULLM template (VAIV Task 2/3), and KULLM's variant with an input.
    "kullm": Preset(
        plain="아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
        "### 명령어:\n{prompt}\n\n### 응답:\n",
        with_input="아래는 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. "
        "요청을 적절히 완료하는 응답을 작성하세요.\n\n"
        "### 명령어:\n{prompt}\n\n### 입력:\n{input}\n\n### 응답:\n",
    ),
    "alpaca": Preset(
        plain="Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n",
        with_input="Below is an instruction that describes a task, paired with an input that "
        "provides further context. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n",
    ),
}

TEMPLATE_NAMES = (*PRESETS, "chat", "raw")


def check_template(template: str) -> str:
    """A preset's name, 'chat', 'raw', or a custom template with ``{prompt}``: a misspelt
    name (or a custom string without the field) would otherwise render every example as
    the same constant prompt, and SFT would learn answers to no question."""
    if template not in TEMPLATE_NAMES and "{prompt}" not in template:
        raise ValueError(
            f"template {template!r} is none of {', '.join(TEMPLATE_NAMES)} and, as a custom "
            "template, has no {prompt} for the instruction"
        )
    return template


def flatten(messages: list[Message]) -> str:
    """A multi-turn history as one instruction, for single-turn templates."""
    if len(messages) == 1:
        return messages[0].content
    speaker = {"system": "System", "user": "Human", "assistant": "Assistant"}
    return "\n".join(f"{speaker[m.role]}: {m.content}" for m in messages)


def render_prompt(
    template: str, messages: list[Message], context: str | None = None, tokenizer=None
) -> str:
    """The text before the response under ``template`` (a preset name, 'chat', 'raw',
    or a custom string with ``{prompt}``)."""
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("the 'chat' template needs a tokenizer with a chat template")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if context:
            turns[-1] = {**turns[-1], "content": f"{turns[-1]['content']}\n\n{context}"}
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    prompt = flatten(messages)
    if template == "raw":
        return f"{prompt}\n\n{context}" if context else prompt
    if template in PRESETS:
        preset = PRESETS[template]
        if context:
            return preset.with_input.format(prompt=prompt, input=context)
        return preset.plain.format(prompt=prompt)
    if context and "{input}" not in template:
        raise ValueError(
            "the template has no {input} for the example's input (Alpaca's 'input' field); "
            "add one, or use a preset or 'chat'"
        )
    # one pass: a prompt that contains "{input}" keeps it as text
    values = {"prompt": prompt, "input": context or ""}
    return re.sub(r"\{(prompt|input)\}", lambda m: values[m.group(1)], template)


def message_spans(text: str, render, contents: list[str]) -> list[list[int]] | None:
    """Where the ``contents`` (the messages' own texts) lie in ``text``, their rendering by
    ``render`` (a function of the contents): ``[start, stop]`` character offsets in order
    of place, so that a training stage reads a special token's text there as text and
    everywhere else as the template's token (:func:`jobs.tokens.encode_spans`).

    Found by rendering numbered stand-ins in the contents' places and reading ``text``
    piece by piece against it, each content as it is or stripped (Llama-2's and Gemma's
    templates trim it). Searching ``text`` for a content instead finds one that is only a
    special token's text in the template's own ("<s>" after Llama-2's leading "<s>"), and
    misses one the template splits (an Alpaca input joined to its instruction). None where
    the renderings do not line up: a template that rewrites a content."""
    marked = render([f"\x00{index}\x00" for index in range(len(contents))])
    pieces = re.split("\x00(\\d+)\x00", marked)  # template, index, template, ..., template
    if not text.startswith(pieces[0]):
        return None
    at, spans = len(pieces[0]), []
    for index, after in zip(pieces[1::2], pieces[2::2], strict=True):
        content = contents[int(index)]
        for written in dict.fromkeys(
            (content, content.strip(), content.lstrip(), content.rstrip())
        ):
            if text.startswith(written, at) and text.startswith(after, at + len(written)):
                break
        else:
            return None
        if written:
            spans.append([at, at + len(written)])
        at += len(written) + len(after)
    return spans if at == len(text) else None


def prompt_spans(
    prompt: str,
    template: str,
    messages: list[Message],
    context: str | None = None,
    tokenizer=None,
) -> list[list[int]] | None:
    """Where the messages and the input lie in ``prompt``, their :func:`render_prompt`."""
    contents = [m.content for m in messages] + ([context] if context else [])

    def render(texts: list[str]) -> str:
        standing = [Message(m.role, text) for m, text in zip(messages, texts, strict=False)]
        return render_prompt(template, standing, texts[-1] if context else None, tokenizer)

    return message_spans(prompt, render, contents)


def prompt_turns(messages: list[Message], context: str | None) -> list[dict[str, str]]:
    """The conversation before the response as role/content turns (what a chat endpoint or
    a chat template is given), an Alpaca/KULLM input joined to the last instruction."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    users = [i for i, t in enumerate(turns) if t["role"] == "user"]
    if context and users:  # an Alpaca/KULLM input joins the instruction it belongs to
        last_user = users[-1]
        turns[last_user] = {
            **turns[last_user],
            "content": f"{turns[last_user]['content']}\n\n{context}",
        }
    return turns


def asked_turns(row: dict) -> list[dict[str, str]]:
    """A prompts row's conversation as turns (a prompts file written before rows carried
    their ``messages``: its instruction as the one user turn)."""
    return row.get("messages") or [{"role": "user", "content": row["instruction"]}]


def conversation(messages: list[Message], response: str, context: str | None = None) -> list[dict]:
    """The whole conversation as role/content turns, the response last (for the stages that
    lay turns out themselves, such as crlft)."""
    return [*prompt_turns(messages, context), {"role": "assistant", "content": response}]


def answer_end(tokenizer, turns: list[dict[str, str]]) -> str:
    """What the chat template writes after an assistant answer to ``turns`` (``<|im_end|>\n``,
    ``<|eot_id|>``, `` </s>``): a preference pair's answers end with it, as SFT trained
    them to (TRL's DPO takes the chosen text from the rendered conversation the same way),
    not with the tokenizer's EOS, which a base tokenizer may not close turns with."""
    marker = "\x00answer\x00"  # text no template writes itself
    try:
        before = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(
            [*turns, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception as exc:  # jinja raises its own types from inside a template
        raise ValueError(f"the chat template cannot render this conversation ({exc})") from None
    if not after.startswith(before) or marker not in after[len(before) :]:
        raise ValueError(
            "the chat template does not write an answer after the generation prompt as it "
            "is given, so where an answer ends cannot be found; use a single-turn template"
        )
    return after[after.index(marker, len(before)) + len(marker) :]


def chat_segments(tokenizer, turns: list[dict[str, str]]) -> list[dict]:
    """The conversation under the tokenizer's chat template as pieces of text in order, each
    assistant turn (with whatever the template closes it with: ``<|im_end|>``,
    ``<|eot_id|>``, ``</s>``) marked trained and everything else not.

    Found by rendering each prefix of the conversation: the text before an assistant turn
    is the prefix rendered with the generation prompt, the turn is what the next prefix
    adds (the approach of templates without ``{% generation %}`` markers). A template whose
    renders are not prefixes of each other (one that rewrites earlier turns) is refused.
    """
    segments: list[dict] = []
    done = ""
    for index, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        try:
            before = tokenizer.apply_chat_template(
                turns[:index], tokenize=False, add_generation_prompt=True
            )
            after = tokenizer.apply_chat_template(turns[: index + 1], tokenize=False)
        except Exception as exc:  # jinja raises its own types from inside a template
            raise ValueError(f"the chat template cannot render this conversation ({exc})") from None
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(
                "the chat template renders earlier turns differently as the conversation "
                "grows, so its assistant turns cannot be told apart; use a single-turn template"
            )
        segments += [
            {"text": before[len(done) :], "train": False},
            {"text": after[len(before) :], "train": True},
        ]
        done = after
    return segments


def conversation_spans(
    segments: list[dict], turns: list[dict], tokenizer
) -> list[list[int]] | None:
    """Where the turns' contents lie in the text of their :func:`chat_segments`."""

    def render(texts: list[str]) -> str:
        standing = [{**turn, "content": text} for turn, text in zip(turns, texts, strict=True)]
        return "".join(piece["text"] for piece in chat_segments(tokenizer, standing))

    text = "".join(piece["text"] for piece in segments)
    return message_spans(text, render, [turn["content"] for turn in turns])
