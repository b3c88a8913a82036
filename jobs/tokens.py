"""Text to token ids the way a model was pre-trained to see it, shared by every stage that
tokenises: BOS where the tokenizer puts one, and position ids that ignore padding."""

from __future__ import annotations

import weakref

import torch

_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def encode(tokenizer, text: str, bos: bool = True) -> list[int]:
    """``text``'s ids, after BOS where the tokenizer expects it (not twice when the text, as
    a chat template's output may, already starts with it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
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
