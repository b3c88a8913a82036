"""Text to token ids the way a model was pre-trained to see it, shared by every stage that
tokenises: BOS where the tokenizer puts one, and position ids that ignore padding."""

from __future__ import annotations

import bisect
import functools
import inspect
import json
import weakref
from collections.abc import Iterable

import torch

_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SPECIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FRESH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CONTINUATION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer adds BOS to the text it encodes (Llama, Mistral, Gemma),
    else ``[]`` (GPT-2, GPT-NeoX, Qwen). Every stage encodes pieces of text without special
    tokens, so that a prompt and its answer join without a BOS between them; the start of
    a sequence then needs the BOS the model saw in pre-training, added here once."""
    if tokenizer not in _BOS:  # probed once per tokenizer: this runs for every row
        bos = tokenizer.bos_token_id
        probe = tokenizer("a")["input_ids"] if bos is not None else []
        _BOS[tokenizer] = [bos] if probe and probe[0] == bos else []
    return list(_BOS[tokenizer])


def special_tokens(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens (BOS, EOS, a chat template's end of turn...) by their
    text; probed again once tokens are added (crlft adds its end of turn)."""
    size = len(tokenizer)
    if _SPECIAL.get(tokenizer, (None,))[0] != size:
        ids = set(tokenizer.all_special_ids) | {
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special
        }
        _SPECIAL[tokenizer] = (size, {tokenizer.convert_ids_to_tokens(i): i for i in ids})
    return _SPECIAL[tokenizer][1]


def fresh_after_special(tokenizer) -> bool:
    """Whether the tokenizer encodes text after a special token as it encodes the same text
    alone (byte-level BPE; a Metaspace that prepends its word start to every stretch), not
    as a continuation (a Metaspace with ``prepend_scheme: first``, Llama-2's, Mistral's)."""
    if tokenizer not in _FRESH:
        name, token = min(special_tokens(tokenizer).items(), key=lambda item: item[1])
        after = tokenizer(name + "ab cd", add_special_tokens=False)["input_ids"]
        alone = tokenizer("ab cd", add_special_tokens=False)["input_ids"]
        _FRESH[tokenizer] = after == [token, *alone]
    return _FRESH[tokenizer]


def continuation(tokenizer):
    """For a Metaspace tokenizer that starts only the text with a word start (``first``):
    a copy of its backend that reads special tokens' texts as text and starts nothing, to
    encode a stretch after a special token as the whole text's encoding continues there.
    None for others."""
    if tokenizer not in _CONTINUATION:
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        spec = json.loads(backend.to_str()) if backend is not None else {}
        found = []

        def never(node) -> None:  # every Metaspace, a Sequence's included
            if isinstance(node, dict):
                if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                    node["prepend_scheme"] = "never"
                    found.append(node)
                for value in node.values():
                    never(value)
            elif isinstance(node, list):
                for value in node:
                    never(value)

        never(spec.get("pre_tokenizer"))
        copy = None
        if found:
            copy = Tokenizer.from_str(json.dumps(spec))
            copy.encode_special_tokens = True
        _CONTINUATION[tokenizer] = copy
    return _CONTINUATION[tokenizer]


# A message's own text in a rendering, where a special token's text is text: sought in
# order, or (position, text) where its place is known.
MessageText = str | tuple[int, str]


def _without(text: str, specials) -> str:
    for name in specials:
        text = text.replace(name, "")
    return text


def literal_spans(tokenizer, text: str, literal: Iterable[MessageText]) -> list[tuple[int, int]]:
    """Where in ``text`` the ``literal`` texts lie, when any holds a special token's text;
    none otherwise, the common case. Each is sought after the one before, as a
    conversation's messages follow each other in its rendering, and stripped where a
    template strips messages (Llama-2's, Gemma's); ``(position, text)`` is one whose place
    is known (an answer after its prompt, which may quote it)."""
    literal = list(literal)
    specials = special_tokens(tokenizer)
    if not any(
        name in (item if isinstance(item, str) else item[1])
        for item in literal
        for name in specials
    ):
        return []
    spans, cursor = [], 0
    for item in literal:
        if isinstance(item, tuple):
            at, content = item
            at = at if text.startswith(content, at) else -1
        else:
            content = item
            at = text.find(content, cursor) if content else -1
            # stripped, as the template may have; not where nothing but special text is
            # left, which could not be told from the template's own tokens
            if at < 0 and _without(content, specials).strip():
                content = content.strip()
                at = text.find(content, cursor)
        if at >= 0 and content:  # a template that rewrites a message leaves it unfound
            spans.append((at, at + len(content)))
            cursor = at + len(content)
    return spans


def _cuts(spans: list[tuple[int, int]], length: int) -> dict[int, int]:
    """The places the text can be cut between two of its tokens: character position ->
    the index of the token after the cut."""
    cuts: dict[int, int] = {}
    reach = 0
    for index, (start, stop) in enumerate(spans):
        # a trimmed space: either side; none where a token overlaps the one before (a word
        # start mapped onto the character after it)
        for position in range(reach, start + 1):
            cuts.setdefault(position, index)
        reach = max(reach, stop)
    for position in range(reach, max(length, reach) + 1):
        cuts.setdefault(position, len(spans))
    return cuts


def encode_spans(
    tokenizer, text: str, literal: Iterable[MessageText] = ()
) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s ids (no BOS) and each one's character span. A special token's text is the
    token (a template's markup: ``<|im_end|>``), except inside the ``literal`` texts, the
    messages' own contents (:func:`literal_spans`): there "</s>" (an HTML answer) or
    "<|endoftext|>" is text, as OpenChat tokenises a message's content
    (``ochat/config/conversation_template.py``, special tokens split); read as the token,
    an answer would train a stop token in its middle (TRL's SFT does). The text between
    the template's special tokens around such a message is encoded as the tokenizer
    encodes a stretch there: alone, or as a continuation where only the text's start gets a
    word start (:func:`continuation`); a special token's text encoded alone would get one
    that is not in the text. For other tokenizers, the whole text's tokens with special
    tokens split, between the nearest cuts where both encodings go on alike."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(encoded["input_ids"]), [tuple(s) for s in encoded["offset_mapping"]]
    inside = literal_spans(tokenizer, text, literal)
    named = {token: name for name, token in special_tokens(tokenizer).items()}

    def special(token: int, start: int, stop: int) -> bool:
        # a special token written in the text: not an unknown character read as <unk>
        return token in named and named[token] in text[start:stop]

    # the special tokens written in the text: inside a message (to be read as text), or the
    # template's own markup (a stretch may reach past its message, a space before an
    # answer being the template's, but not across one of them)
    found: list[int] = []
    markup: list[tuple[int, tuple[int, int]]] = []
    for i, (token, span) in enumerate(zip(ids, spans, strict=True)):
        if special(token, *span):
            if any(a <= span[0] and span[1] <= b for a, b in inside):
                found.append(i)
            else:
                markup.append((i, span))
    if not found:
        return ids, spans

    @functools.cache
    def split():
        # the whole text with special tokens split, and the cuts both encodings share: for
        # the splice below, which only tokenizers neither fresh nor continued need
        plain = tokenizer(
            text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
        )
        plain_spans = [tuple(s) for s in plain["offset_mapping"]]
        ours, theirs = _cuts(spans, len(text)), _cuts(plain_spans, len(text))
        return list(plain["input_ids"]), plain_spans, ours, theirs, sorted(set(ours) & set(theirs))

    # a common cut after which both have the same token: after a special token a Metaspace
    # tokenizer starts a word ("<s>old" -> "<s>", "▁old"), the same cut, another token
    def agree(x: int) -> bool:
        plain_ids, _, ours, theirs, _ = split()
        a, b = ours[x], theirs[x]
        if a >= len(ids) or b >= len(plain_ids):
            return a >= len(ids) and b >= len(plain_ids)
        return ids[a] == plain_ids[b]

    absorbing = {  # token -> (lstrip, rstrip)
        i: (t.lstrip, t.rstrip)
        for i, t in tokenizer.added_tokens_decoder.items()
        if t.lstrip or t.rstrip
    }
    out_ids: list[int] = []
    out_spans: list[tuple[int, int]] = []
    done, floor = 0, 0  # tokens of ``ids`` taken so far, and where they end in the text
    for index in found:
        if index < done:
            continue  # inside the stretch just replaced
        start, stop = spans[index]
        # the stretch's bounds: the template's special tokens either side (by token, not by
        # character: a trimmed space's token has no width, at either side of a cut)
        before = [(i, b) for i, (a, b) in markup if b <= start]
        after = [(i, a) for i, (a, b) in markup if a >= stop]
        begin, lower = (before[-1][0] + 1, before[-1][1]) if before else (0, 0)
        end, upper = after[0] if after else (len(ids), len(text))
        # a template token that strips whitespace (an added token's rstrip / lstrip) took
        # the whitespace beside it, which a trimmed offset leaves outside its span
        if before and absorbing.get(ids[before[-1][0]], (False, False))[1]:
            while lower < start and text[lower].isspace():
                lower += 1
        if after and absorbing.get(ids[end], (False, False))[0]:
            while upper > stop and text[upper - 1].isspace():
                upper -= 1
        begin, lower = max(begin, done), max(lower, floor)
        fresh = lower == 0 or fresh_after_special(tokenizer)
        if fresh or continuation(tokenizer) is not None:
            # the stretch between the template's special tokens, encoded as the tokenizer
            # encodes one there (alone, or as a continuation): exactly the text's tokens
            if fresh:
                part = tokenizer(
                    text[lower:upper],
                    add_special_tokens=False,
                    split_special_tokens=True,
                    return_offsets_mapping=True,
                )
                part_ids, part_spans = part["input_ids"], part["offset_mapping"]
            else:
                part = continuation(tokenizer).encode(text[lower:upper], add_special_tokens=False)
                part_ids, part_spans = part.ids, part.offsets
            out_ids += ids[done:begin] + list(part_ids)
            out_spans += spans[done:begin] + [(lower + a, lower + b) for a, b in part_spans]
            done, floor = end, upper
            continue
        # else the whole text's tokens with special tokens split, from and to the nearest
        # cuts where both encodings go on alike (alone, a continuation would get a word start)
        plain_ids, plain_spans, ours, theirs, both = split()
        at = bisect.bisect_right(both, start) - 1  # the nearest agreeing cuts either side
        while at >= 0 and both[at] >= lower and not agree(both[at]):
            at -= 1
        low = both[at] if at >= 0 and both[at] >= lower else None
        at = bisect.bisect_left(both, stop)
        while at < len(both) and both[at] <= upper and not agree(both[at]):
            at += 1
        high = both[at] if at < len(both) and both[at] <= upper else None
        if low is None or high is None:  # no agreeing cut: the token's text alone
            alone = tokenizer(
                text[start:stop],
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            out_ids += ids[done:index] + list(alone["input_ids"])
            out_spans += spans[done:index] + [
                (start + a, start + b) for a, b in alone["offset_mapping"]
            ]
            done, floor = index + 1, stop
            continue
        out_ids += ids[done : ours[low]] + plain_ids[theirs[low] : theirs[high]]
        out_spans += spans[done : ours[low]] + plain_spans[theirs[low] : theirs[high]]
        done, floor = ours[high], high
    return out_ids + ids[done:], out_spans + spans[done:]


def encode(
    tokenizer, text: str, bos: bool = True, literal: Iterable[MessageText] = ()
) -> list[int]:
    """``text``'s ids, after BOS where the tokenizer expects it (not twice when the text, as
    a chat template's output may, already starts with it); special tokens' texts inside
    the ``literal`` texts stay text (:func:`encode_spans`)."""
    ids = encode_spans(tokenizer, text, literal)[0]
    prefix = bos_prefix(tokenizer) if bos else []
    if prefix and ids[:1] == prefix:
        return ids
    return prefix + ids


def keep_end(ids: list[int], length: int, tokenizer) -> list[int]:
    """The last ``length`` ids of ``ids``, its BOS kept in front where it had one."""
    if len(ids) <= length:
        return ids
    prefix = bos_prefix(tokenizer)
    if prefix and ids[:1] == prefix:
        return prefix + ids[len(ids) - length + 1 :]
    return ids[len(ids) - length :]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real tokens: a left-padded row's first token is at 0, as
    it is unpadded. Models with learned absolute positions (GPT-2, OPT) give other logits
    on left-padded rows without them; rotary models are shift-invariant either way.
    (transformers' ``generate`` derives them the same way.)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def predicted_positions(targets: torch.Tensor) -> torch.Tensor:
    """The positions whose logits a loss reads: those whose next token is a target in any
    row (``targets`` [batch, len], true at every predicted token). Found on the host, where
    the batch is built: found on the GPU, their count would make the host wait for it."""
    return targets[:, 1:].any(0).nonzero().squeeze(1)


@functools.cache
def _keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def logits_at(model, positions: torch.Tensor, **inputs) -> torch.Tensor:
    """A causal LM's logits [batch, len(positions), vocab] at ``positions`` (the same for
    every row) only: the vocabulary-wide projection, and all that follows it (the fp32
    copy, the log-softmax, their gradients), on the positions a loss reads, not on prompts
    and padding, as TRL's trainers ask (``logits_to_keep``, GRPOTrainer's
    ``_get_per_token_logps``). ``model``: a transformers model, bare or inside a DeepSpeed
    engine or a peft wrapper; one whose forward lacks the argument computes every logit,
    and they are picked after."""
    from jobs.models import transformers_model  # (here: jobs.models brings the stage contract)

    if not _keeps_logits(type(transformers_model(model))):
        return model(**inputs, use_cache=False).logits[:, positions]
    logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
    if logits.size(1) != positions.numel():
        # a wrapper that dropped the argument: gather would read the wrong positions quietly
        raise RuntimeError(
            f"{type(model).__name__} returned logits at {logits.size(1)} positions for "
            f"logits_to_keep's {positions.numel()}"
        )
    return logits


def padded_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """:func:`logits_at` ``kept`` over a padded batch (left or right), with :func:`positions`."""
    return logits_at(
        model,
        kept,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
    )
