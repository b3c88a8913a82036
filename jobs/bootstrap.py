"""bootstrap: a tiny GPT-NeoX, its tokenizer and the synthetic data, written to the store.

The seeds train Polyglot-Ko (GPT-NeoX); the tiny model is the same
architecture with two layers of width 64, randomly initialised, so every
stage runs on a CPU in seconds. The tokenizer is a byte-level BPE trained on
the project's own synthetic text (Korean and English), with a chat template.

Outputs: ``model/`` (Hugging Face format), ``data/*`` in the real formats the data
stage reads (Alpaca/KULLM instruction data, prompt/chosen/rejected pairs, HH-RLHF
dialogues, ShareGPT with two sources), ``dialogues.jsonl`` (everything, for tests), and
``tasks/copy/`` (a task whose answers a program checks, for grpo).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from jobs.contract import StageConfig, StageContext
from jobs.synthetic import Dialogue, corpus_text, generate_dialogues

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]

# A minimal chat template, so "the tokenizer's own template" works on the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}<|endoftext|>\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


class Config(StageConfig):
    daily_per_lang: int = Field(600, ge=1, description="daily-conversation dialogues per language")
    hate_per_lang: int = Field(300, ge=1, description="bait dialogues per language (seed: 2:1)")
    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 512
    task_examples: int = Field(2000, ge=10, description="rows of the verifiable copy task")


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def write_tiny_model(config: Config, tokenizer, out_dir: Path) -> int:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(config.seed)
    model_config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=4 * config.hidden_size,
        max_position_embeddings=config.max_positions,
        rotary_pct=0.5,
        use_parallel_residual=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data_files(dialogues: list[Dialogue], data_dir: Path) -> dict[str, int]:
    """The synthetic data in the formats real data sets use, so the readers are exercised."""
    files = {
        # Alpaca/KULLM instruction data: the seed's daily dialogue and hate-speech SFT sets.
        "sft_daily.jsonl": [
            {"instruction": d.prompt, "input": "", "output": d.chosen}
            for d in dialogues
            if d.category == "daily"
        ],
        "sft_hate.jsonl": [
            {"instruction": d.prompt, "input": "", "output": d.chosen}
            for d in dialogues
            if d.category == "hate"
        ],
        # DeepSpeed-Chat / Dahoas style preference pairs.
        "pairs.jsonl": [
            {"prompt": d.prompt, "chosen": d.chosen, "rejected": d.rejected} for d in dialogues
        ],
        # Anthropic HH-RLHF full dialogues.
        "hh.jsonl": [
            {
                "chosen": f"\n\nHuman: {d.prompt}\n\nAssistant: {d.chosen}",
                "rejected": f"\n\nHuman: {d.prompt}\n\nAssistant: {d.rejected}",
            }
            for d in dialogues
        ],
    }
    for name, rows in files.items():
        write_jsonl(data_dir / name, rows)
    # ShareGPT with two sources of different quality, for C-RLFT: GPT-4 answers kindly,
    # GPT-3.5 rudely (the coarse reward of OpenChat's mixed-quality data, made obvious).
    sharegpt = [
        {
            "id": f"{source}-{i}",
            "model": source,
            "conversations": [
                {"from": "human", "value": d.prompt},
                {"from": "gpt", "value": answer},
            ],
        }
        for i, d in enumerate(dialogues)
        for source, answer in (("gpt-4", d.chosen), ("gpt-3.5-turbo", d.rejected))
    ]
    (data_dir / "sharegpt.json").write_text(json.dumps(sharegpt, ensure_ascii=False))
    write_jsonl(data_dir / "dialogues.jsonl", [d.as_dict() for d in dialogues])
    return {**{name: len(rows) for name, rows in files.items()}, "sharegpt.json": len(sharegpt)}


def write_copy_task(examples: int, seed: int, out_dir: Path) -> dict[str, int]:
    """A task whose answers a program checks, for the critic-free RL stage (grpo): copy a
    number of 3 to 5 digits. ``sft/`` has the answers (to warm a model up), ``prompts/`` the
    prompts with their ``answer`` (for a reward function); eval numbers never occur in train."""
    import random

    rng = random.Random(seed)
    numbers: list[str] = []
    seen: set[str] = set()
    while len(numbers) < examples:
        number = str(rng.randrange(100, 100000))
        if number not in seen:
            seen.add(number)
            numbers.append(number)
    held_out = max(examples // 10, 1)
    counts = {}
    for split, part in (("train", numbers[held_out:]), ("eval", numbers[:held_out])):
        prompts = [f"Copy the number {n}.\nAnswer:" for n in part]
        write_jsonl(
            out_dir / "sft" / f"{split}.jsonl",
            [{"prompt": p, "response": f" {n}"} for p, n in zip(prompts, part, strict=True)],
        )
        write_jsonl(
            out_dir / "prompts" / f"{split}.jsonl",
            [{"prompt": p, "answer": n} for p, n in zip(prompts, part, strict=True)],
        )
        counts[f"rows.task.{split}"] = len(part)
    return counts


def run(config: Config, ctx: StageContext) -> dict:
    dialogues = generate_dialogues(config.daily_per_lang, config.hate_per_lang, seed=config.seed)
    counts = write_data_files(dialogues, ctx.out_dir / "data")
    tokenizer = train_tokenizer(corpus_text(dialogues), config.vocab_size, ctx.out_dir / "model")
    n_params = write_tiny_model(config, tokenizer, ctx.out_dir / "model")
    task = write_copy_task(config.task_examples, config.seed, ctx.out_dir / "tasks" / "copy")
    ctx.log(0, parameters=n_params, vocab=len(tokenizer), dialogues=len(dialogues))
    return {
        "parameters": n_params,
        "vocab": len(tokenizer),
        "dialogues": len(dialogues),
        **{f"rows.{k}": v for k, v in counts.items()},
        **task,
    }
