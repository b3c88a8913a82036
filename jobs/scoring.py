"""A reward model's scores: the scalar head read at the last real token of each row.

Shared by the stages that train a reward model (reward), score with one (label, evaluate,
grpo) or train against one (ppo's critic and reward model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from jobs.batches import pad
from jobs.errors import BadInputError
from jobs.models import InferenceConfig, quiet_load_report, transformers_model
from jobs.tokens import MessageText, keep_end, positions
from jobs.tokens import encode as encode_text


def encode(
    tokenizer,
    prompt: str,
    response: str,
    max_len: int,
    finished: bool = True,
    prompt_literal: Iterable[MessageText] = (),
) -> list[int]:
    """BOS (where expected) + prompt + response + EOS, keeping the end when too long (the
    answer is what is judged). An answer cut at its token limit (``finished`` false) gets
    no EOS: it is read at its last token, as PPO reads one (:func:`ending_in_eos`) and TRL
    and DeepSpeed-Chat do, not as a finished answer. The answer's special-token texts are
    text, and the prompt's in ``prompt_literal`` (its messages: a pair's ``literals``)."""
    ending = [tokenizer.eos_token_id] if finished else []
    literal = [*prompt_literal, (len(prompt), response)]
    ids = encode_text(tokenizer, prompt + response, literal=literal)
    return keep_end(ids + ending, max_len, tokenizer)


def ending_in_eos(
    sequences: torch.Tensor, attention: torch.Tensor, ended: torch.Tensor, eos_id: int
) -> torch.Tensor:
    """Sampled rows (left-padded prompt, answer, padding) as a reward model is trained to
    read a finished answer, the answer then EOS (:func:`encode`): a row that stopped at
    another stop token (a chat template's end of turn) has it replaced by EOS. A row cut
    at the token limit stays as it is, read at its last token as TRL and DeepSpeed-Chat
    read it (``missing_eos_penalty`` is the explicit price of not finishing)."""
    rows = torch.arange(sequences.size(0), device=sequences.device)
    last = last_positions(attention)
    judged = sequences.clone()
    judged[rows[ended], last[ended]] = eos_id
    return judged


def head_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head's value at every position [batch, len]: a reward model's score, a
    PPO critic's value. Any of a plain model, a DeepSpeed engine or a LoRA (peft) model:
    the sequence classifier's ``base_model`` (the backbone) and ``score`` (the head) are
    called apart (the classifier's own forward reads the last token only)."""
    model = transformers_model(model)
    hidden = model.base_model(  # no KV cache: a scoring forward never decodes further
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One score per row, read at its last non-padding token (left or right padding)."""
    values = head_values(model, input_ids, attention_mask)
    return values.gather(1, last_positions(attention_mask)[:, None]).squeeze(1)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last non-padding position (left or right padding)."""
    return attention_mask.size(1) - 1 - attention_mask.flip(-1).argmax(-1)


def batch_scores(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    input_ids = pad(rows, pad_id).to(device)
    mask = pad([[1] * len(r) for r in rows], 0).to(device)
    return last_token_scores(model, input_ids, mask)


@torch.no_grad()
def score_texts(
    model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    max_len: int = 512,
    batch_size: int = 16,
    finished: list[bool] | None = None,
    literals: list[list[MessageText]] | None = None,
) -> list[float]:
    """Reward-model scores of (prompt, response) pairs: for labelling and evaluation.
    ``finished``: per response, whether it ended (EOS, end of turn, an endpoint's stop)
    rather than being cut at its token limit; by default all did. ``literals``: per
    prompt, where its messages lie (its row's :func:`jobs.batches.literals`), read as the
    reward stage read them in training."""
    finished = finished or [True] * len(responses)
    literals = literals or [[] for _ in prompts]
    rows = [
        encode(tokenizer, p, r, max_len, done, placed)
        for p, r, done, placed in zip(prompts, responses, finished, literals, strict=True)
    ]
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        out += batch_scores(
            model, rows[start : start + batch_size], tokenizer.pad_token_id
        ).tolist()
    return out


def require_reward_model(path: str) -> None:
    """Refuse, before loading any weights, a model that is not a reward model."""
    from transformers import AutoConfig

    labels = AutoConfig.from_pretrained(path).num_labels
    if labels != 1:
        raise BadInputError(
            f"{path}: not a reward model (it has {labels} outputs, not 1); "
            "give the model folder of a reward stage's output"
        )


def load_reward_model(path: str, settings: InferenceConfig | None = None):
    """A reward stage's model (a sequence classifier with one output), for scoring on the
    configured device in the configured precision."""
    from transformers import AutoModelForSequenceClassification

    require_reward_model(path)
    settings = settings or InferenceConfig()
    device = settings.torch_device()
    with quiet_load_report():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=settings.torch_dtype(device)
        )
    return model.to(device).eval()
