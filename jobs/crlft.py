"""crlft: OpenChat's Conditioned-RLFT on mixed-quality data (seed: OpenChat review).

Every data source is a class: its tag conditions every turn ("GPT4 User: ... GPT4
Assistant: ..." for the expert source, "GPT3 User: ..." for the sub-optimal one), a new
end-of-turn token closes each turn (added to the tokenizer, embeddings resized, and
made a stop token so generation ends there), BOS goes first where the tokenizer expects
one, every assistant turn is trained, and the loss is the mean of the answer tokens'
losses weighted by their source's coarse reward (the paper: 1.0 for GPT-4 data, 0.1 for
GPT-3.5 data), normalised by the sum of the weights over the optimiser step (all
micro-batches and ranks) as OpenChat's trainer does. At
inference, prompting with the expert tag asks for expert-quality answers.

Reads ``sft/{train,eval}.jsonl`` of a data stage output whose rows carry a ``label``
(ShareGPT's model field, or a source's ``label``) and the conversation in ``messages``
(the data stage writes it whatever its template). Writes ``model/``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from jobs import dist, engine
from jobs.batches import ShardedSampler, compact, read_jsonl
from jobs.contract import StageConfig, StageContext
from jobs.engine import EngineConfig
from jobs.errors import BadInputError
from jobs.models import load_tokenizer, model_source
from jobs.supervised import (
    collate,
    encode_segments,
    step_share,
    to_device,
    token_losses,
    trained_targets,
)
from jobs.tokens import MessageText

END_OF_TURN = "<|end_of_turn|>"


class ClassConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: str = Field(description="conditions the prompt: '<tag> User:' / '<tag> Assistant:'")
    weight: float = Field(gt=0, description="the coarse reward: the loss weight of its examples")


DEFAULT_CLASSES = {
    "gpt-4": ClassConfig(tag="GPT4", weight=1.0),
    "gpt-3.5-turbo": ClassConfig(tag="GPT3", weight=0.1),
}


class Config(StageConfig, engine.Schedule):
    model: str = Field(description="the base model (a stage output folder or Hub id)")
    data: str = Field(description="a data stage output whose sft rows have a 'label'")
    classes: dict[str, ClassConfig] = Field(
        default_factory=lambda: dict(DEFAULT_CLASSES), description="label -> tag and weight"
    )
    end_of_turn: str = END_OF_TURN
    max_seq_len: int = Field(512, ge=8)
    train: EngineConfig = EngineConfig(learning_rate=2e-5)


def conditioned(prompt: str, tag: str, end_of_turn: str) -> str:
    """OpenChat's class-conditioned single-turn prompt, as asked at inference."""
    return f"{tag} User: {prompt}{end_of_turn}{tag} Assistant:"


ROLES = {"user": "User", "assistant": "Assistant"}


def layout(
    turns: list[dict], tag: str, end_of_turn: str
) -> tuple[list[tuple[str, bool]], list[MessageText]]:
    """A conversation as OpenChat lays it out (``ochat/config/conversation_template.py``):
    a system text closed by the end-of-turn token, then every turn as ``"{tag} User:"`` /
    ``"{tag} Assistant:"``, a space, its text and the end-of-turn token; each assistant
    turn, its end-of-turn included, is trained (OpenChat gives user turns weight 0). Also
    where each turn's own text lies, in which a special token's text is text."""
    pieces: list[tuple[str, bool]] = []
    literal: list[MessageText] = []
    at = 0
    for turn in turns:
        added = len(pieces)
        if turn["role"] == "system":
            literal.append((at, turn["content"]))
            pieces.append((turn["content"] + end_of_turn, False))
        else:
            header = f"{tag} {ROLES[turn['role']]}:"
            literal.append((at + len(header) + 1, turn["content"]))
            pieces.append((header, False))
            pieces.append((f" {turn['content']}{end_of_turn}", turn["role"] == "assistant"))
        at += sum(len(text) for text, _ in pieces[added:])
    return pieces, literal


def weighted_loss(
    model, batch: dict[str, torch.Tensor], weights: torch.Tensor, total_weight=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenChat's weighted loss: every answer token's cross-entropy weighted by its class
    reward, divided by ``total_weight``: the sum of those weights over the whole optimiser
    step (every micro-batch, every rank), as OpenChat's trainer divides by the step's total
    (``ochat/training_deepspeed/train.py``). Dividing by a micro-batch's own sum would
    cancel the weights in a micro-batch of one class (and entirely at micro-batch size 1).
    Also returns the micro-batch's own weighted mean, for logging."""
    losses, mask = token_losses(model, batch)
    token_weights = mask.float() * weights[:, None]
    weighted = (losses * token_weights).sum()
    own = weighted.detach() / token_weights.sum().clamp(min=1e-8)
    if total_weight is None:
        return own, own
    return weighted / total_weight, own


def answer_weight(items) -> float:
    """The sum of the class weights of the answer tokens (those with a next-token label)."""
    return sum(item[2] * trained_targets([item]) for item in items)


def prepare(rows: list[dict], config: Config, tokenizer, where: str):
    """(ids, labels, weight, label) per row: its conversation (``messages``, or the prompt
    and response of a row without them) laid out under its class's tag, answers trained."""
    out = []
    for number, row in enumerate(rows, start=1):
        label = row.get("label")
        if label not in config.classes:
            raise BadInputError(
                f"{where}:{number}: field 'label': {label!r} is not one of the "
                f"classes {sorted(config.classes)}"
            )
        cls = config.classes[label]
        turns = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
        if not all(
            isinstance(t, dict)
            and t.get("role") in ("system", "user", "assistant")
            and isinstance(t.get("content"), str)
            for t in turns
        ):
            raise BadInputError(
                f"{where}:{number}: field 'messages' needs turns with a role "
                "(system/user/assistant) and text 'content'"
            )
        pieces, literal = layout(turns, cls.tag, config.end_of_turn)
        ids, labels = encode_segments(pieces, tokenizer, config.max_seq_len, [], literal)
        out.append((compact(ids), compact(labels), cls.weight, label))
    return out


def run(config: Config, ctx: StageContext) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    source = model_source(ctx, config.model)
    tokenizer = load_tokenizer(source)
    tokenizer.add_special_tokens({"additional_special_tokens": [config.end_of_turn]})
    eot = tokenizer.convert_tokens_to_ids(config.end_of_turn)
    data_dir = ctx.input_dir(config.data)
    splits = {}
    for split in ("train", "eval"):
        path = data_dir / "sft" / f"{split}.jsonl"
        rows = read_jsonl(path, ("prompt", "response")) if path.is_file() else []
        splits[split] = prepare(rows, config, tokenizer, f"{config.data}/sft/{split}.jsonl")
    if not splits["train"]:
        raise BadInputError(f"{config.data}: no sft/train.jsonl rows")

    cfg = config.train
    with engine.zero3_init(engine.deepspeed_config(cfg, 1)):  # resized partitioned too
        model = AutoModelForCausalLM.from_pretrained(source, **engine.model_options(cfg))
        model.resize_token_embeddings(len(tokenizer))
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = sorted({eot, *(eos if isinstance(eos, list) else [eos])})

    sampler = ShardedSampler(
        len(splits["train"]), cfg.micro_batch_size, config.seed, dist.rank(), dist.world_size()
    )
    total_steps = config.total_steps(sampler, cfg.gradient_accumulation_steps)
    ds = engine.initialize(model, cfg, total_steps)
    state = engine.resume(ds, ctx)
    pad_id = tokenizer.pad_token_id

    def batch_of(items):
        batch = to_device(collate([i[:2] for i in items], pad_id), ds.device)
        return batch, torch.tensor([i[2] for i in items], device=ds.device)

    @torch.no_grad()
    def eval_loss() -> dict:
        ds.eval()
        losses = [
            weighted_loss(ds, *batch_of(splits["eval"][s : s + cfg.micro_batch_size]))[1].item()
            for s in range(0, len(splits["eval"]), cfg.micro_batch_size)
        ]
        ds.train()
        return {"eval_loss": sum(losses) / max(len(losses), 1)}

    evaluating = eval_loss if splits["eval"] else None
    loop = engine.TrainLoop(ds, ctx, config, total_steps, state, ("loss",), evaluating)
    batches = sampler.micro_batches(start=loop.step * cfg.gradient_accumulation_steps)
    for _ in loop.steps():
        window = [
            [splits["train"][i] for i in next(batches)]
            for _ in range(cfg.gradient_accumulation_steps)
        ]
        # the step's gradient: that of sum(w * ce) / sum(w) over all its answer tokens
        share = step_share(
            sum(answer_weight(items) for items in window),
            cfg.gradient_accumulation_steps,
            ds.device,
        )
        for items in window:
            batch, weights = batch_of(items)
            loss, own = weighted_loss(ds, batch, weights, share)
            ds.backward(loss)
            ds.step()
            # counted on the host: reading the mask's sum would wait for the GPU every step
            loop.meter.add(sum(len(item[0]) for item in items), own)
    engine.export_hf(ds, tokenizer, ctx.out_dir / "model", cfg)
    counts = {
        f"examples.{label}": sum(1 for i in splits["train"] if i[3] == label)
        for label in config.classes
    }
    start = {f"{k}_start": v for k, v in loop.first.items()}
    return {"steps": loop.step, "end_of_turn_id": eot, **counts, **start, **loop.summary}
