"""Text to token ids the way a model was pre-trained to see it, shared by every stage that
tokenises: BOS where the tokenizer puts one, and position ids that ignore padding."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SPECIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def literal_spans(
    tokenizer, text: str, literal: Iterable[str], after: int = 0
) -> list[tuple[int, int]]:
    """Where in ``text`` the ``literal`` texts lie (each found after the one before, as a
    conversation's messages follow each other in its rendering, the first at or after
    ``after``), when any holds a special token's text; none otherwise, the common case."""
    literal = list(literal)
    specials = special_tokens(tokenizer)
    if not any(name in content for content in literal for name in specials):
        return []
    spans, cursor = [], after
    for content in literal:
        at = text.find(content, cursor) if content else -1
        if at >= 0:  # a template that rewrites a message (strips it) leaves it unfound
            spans.append((at, at + len(content)))
            cursor = at + len(content)
    return spans


def _cuts(spans: list[tuple[int, int]], length: int) -> dict[int, int]:
    """The places the text can be cut between two of its tokens: character position ->
    the index of the token after the cut."""
    cuts: dict[int, int] = {}
    reach = 0
    for index, (start, stop) in enumerate(spans):
        for position in range(reach, max(start, reach) + 1):  # a trimmed space: either side
            cuts.setdefault(position, index)
        reach = max(reach, stop)
    for position in range(reach, max(length, reach) + 1):
        cuts.setdefault(position, len(spans))
    return cuts


def encode_spans(
    tokenizer, text: str, literal: Iterable[str] = (), after: int = 0
) -> tuple[list[int], list[tuple[int, int]]]:
    """``text``'s ids (no BOS) and each one's character span. A special token's text is the
    token (a template's markup: ``<|im_end|>``), except inside the ``literal`` texts, the
    messages' own contents (:func:`literal_spans`): there "</s>" (an HTML answer) or
    "<|endoftext|>" is text, as OpenChat tokenises a message's content
    (``ochat/config/conversation_template.py``, special tokens split); read as the token,
    an answer would train a stop token in its middle (TRL's SFT does). Such a stretch gets
    the tokens of the whole text encoded with special tokens split, between the nearest
    places inside its message where both encodings cut the text alike (encoded alone, a
    SentencePiece tokenizer would put a word start that is not in the text before it)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(encoded["input_ids"]), [tuple(s) for s in encoded["offset_mapping"]]
    inside = literal_spans(tokenizer, text, literal, after)
    special = set(special_tokens(tokenizer).values())
    found = [
        (i, next(span for span in inside if span[0] <= start and stop <= span[1]))
        for i, (token, (start, stop)) in enumerate(zip(ids, spans, strict=True))
        if token in special and any(a <= start and stop <= b for a, b in inside)
    ]
    if not found:
        return ids, spans
    plain = tokenizer(
        text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
    )
    plain_ids, plain_spans = list(plain["input_ids"]), [tuple(s) for s in plain["offset_mapping"]]
    ours, theirs = _cuts(spans, len(text)), _cuts(plain_spans, len(text))

    # a common cut after which both have the same token: after a special token a Metaspace
    # tokenizer starts a word ("<s>old" -> "<s>", "▁old"), the same cut, another token
    def agree(x: int) -> bool:
        a, b = ours[x], theirs[x]
        if a >= len(ids) or b >= len(plain_ids):
            return a >= len(ids) and b >= len(plain_ids)
        return ids[a] == plain_ids[b]

    both = sorted(set(ours) & set(theirs))
    out_ids: list[int] = []
    out_spans: list[tuple[int, int]] = []
    done, floor = 0, 0  # tokens of ``ids`` taken so far, and where they end in the text
    for index, (first, last) in found:
        if index < done:
            continue  # inside the stretch just replaced
        start, stop = spans[index]
        low = max((x for x in both if max(first, floor) <= x <= start and agree(x)), default=None)
        high = min((x for x in both if stop <= x <= last and agree(x)), default=None)
        if low is None or high is None:  # no common cut in the message: the token alone
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
    tokenizer, text: str, bos: bool = True, literal: Iterable[str] = (), after: int = 0
) -> list[int]:
    """``text``'s ids, after BOS where the tokenizer expects it (not twice when the text, as
    a chat template's output may, already starts with it); special tokens' texts inside
    the ``literal`` texts (sought from ``after`` on) stay text (:func:`encode_spans`)."""
    ids = encode_spans(tokenizer, text, literal, after)[0]
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


def padded_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits over a padded batch (left or right), with :func:`positions`."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    ).logits
