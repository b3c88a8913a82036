"""What a model trains on is what the reference code trains on: packed examples see only
themselves, left padding changes no model's numbers, every assistant turn of a conversation
is trained with its template's end-of-turn, BOS is where the tokenizer wants it, and
C-RLFT lays out and weights conversations as OpenChat does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs.batches import IGNORE, pad
from jobs.contract import StageConfig, run_stage
from jobs.data import stage as data
from jobs.supervised import (
    collate,
    encode_segments,
    end_of_turn_ids,
    pack,
    response_loss,
    token_losses,
    tokenize,
)

FAMILIES = ("gpt_neox", "llama", "gpt2", "opt")


def tiny_lm(family: str, classifier: bool = False):
    """A randomly initialised two-layer model of ``family``; GPT-2 and OPT learn absolute
    positions, GPT-NeoX and Llama rotate."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        OPTConfig,
    )

    size = {"vocab_size": 64, "pad_token_id": 0}
    # The names GPT-NeoX, Llama and OPT share (OPT's feed-forward width has its own name).
    shared = {
        "max_position_embeddings": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        **size,
    }
    config = {
        "gpt2": lambda: GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **size),
        "opt": lambda: OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **shared),
        "gpt_neox": lambda: GPTNeoXConfig(intermediate_size=64, **shared),
        "llama": lambda: LlamaConfig(intermediate_size=64, **shared),
    }[family]()
    torch.manual_seed(0)
    if classifier:
        config.num_labels = 1
        return AutoModelForSequenceClassification.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def logits_alone(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0]


# --- packing ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gpt2"])
def test_packed_examples_give_the_logits_and_loss_of_each_example_alone(family):
    model = tiny_lm(family)
    lengths = [5, 7, 3, 4]
    examples = []
    for n, length in enumerate(lengths):
        ids = [(7 * n + 3 * i) % 60 + 2 for i in range(length)]
        examples.append((ids, [IGNORE] * 2 + ids[2:]))
    # one example trained from its first token on (a conversation whose first turn is
    # trained): alone, that token is never predicted; packed, nothing may predict it either
    examples[1] = (examples[1][0], list(examples[1][0]))
    rows = pack(examples, max_len=16)
    assert [len(r[0]) for r in rows] == [15, 4]  # three examples share the first row
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        # As the training loop calls it (no KV cache: with one, transformers builds no
        # packed-sequence mask).
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
        packed = model(**inputs, use_cache=False).logits
        offset, row = 0, 0
        for ids, _ in examples:
            if offset + len(ids) > len(rows[row][0]):
                offset, row = 0, row + 1
            torch.testing.assert_close(
                packed[row, offset : offset + len(ids)],
                logits_alone(model, ids),
                atol=2e-5,
                rtol=1e-4,
            )
            offset += len(ids)
        # The loss trained on is the token-weighted mean of the examples' own losses, over
        # the tokens each example predicts alone.
        alone = [token_losses(model, collate([e], 0)) for e in examples]
        predicted = sum(int(mask.sum()) for _, mask in alone)
        total = sum((losses * mask).sum() for losses, mask in alone) / predicted
        loss, count = response_loss(model, batch)
        # and the same as one row without padding (how flash-attention gets packed batches)
        flat = collate(rows, pad_id=0, flatten=True)
        flat_loss, flat_count = response_loss(model, flat)
    assert predicted == sum(len(ids) - 2 for ids, _ in examples) + 1
    assert int(count) == int(flat_count) == predicted
    assert flat["input_ids"].shape == (1, sum(lengths))
    # the boundaries flash-attention's variable-length kernel is given: every example's
    bounds = [sum(lengths[:n]) for n in range(len(lengths) + 1)]
    assert flat["cu_seq_lens_q"].tolist() == flat["cu_seq_lens_k"].tolist() == bounds
    assert flat["cu_seq_lens_q"].dtype == torch.int32
    assert flat["max_length_q"] == flat["max_length_k"] == max(lengths)
    torch.testing.assert_close(loss, total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat_loss, total, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_token_losses_are_transformers_own_shifted_loss(family):
    """The oracle the packing test's expected loss rests on: the mean of token_losses over
    the response mask is the loss transformers computes from the labels itself (its own
    shift by one, every logit), on a padded batch with prompt tokens masked; and the
    vocabulary-wide head projected only the positions that predict a label in some row
    (1 to 4: not position 0, which predicts a prompt token in both rows, nor 5, the last),
    while transformers' own loss projects all 6."""
    from jobs.supervised import token_losses

    model = tiny_lm(family)
    examples = [
        ([5, 6, 7, 8, 9, 10], [IGNORE] * 3 + [8, 9, 10]),
        ([11, 12, 13, 14], [IGNORE] * 2 + [13, 14]),
    ]
    batch = collate(examples, pad_id=0)
    projected = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[:-1])
    )
    with torch.no_grad():
        losses, mask = token_losses(model, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        reference = model(**inputs, use_cache=False).loss
    assert int(mask.sum()) == 5
    torch.testing.assert_close((losses * mask).sum() / mask.sum(), reference)
    assert projected == [(2, 4), (2, 6)]


@pytest.mark.parametrize("family", FAMILIES)
def test_packing_is_refused_where_the_model_would_not_isolate_examples(family):
    from jobs.errors import BadInputError
    from jobs.supervised import check_packing_isolates

    model = tiny_lm(family)
    if family == "opt":  # transformers 5's OPT builds its mask without the position ids
        with pytest.raises(BadInputError, match="does not keep packed examples apart"):
            check_packing_isolates(model, "cpu")
    else:
        check_packing_isolates(model, "cpu")


# --- position ids on left padding ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_rows_give_the_numbers_of_the_row_alone(family):
    from jobs.dpo import sequence_logps
    from jobs.rollout import token_logprobs
    from jobs.scoring import last_token_scores

    lm, rm = tiny_lm(family), tiny_lm(family, classifier=True)
    rows = [[5, 6, 7, 8, 9, 10, 11, 12], [7, 8, 9], [20, 21, 22, 23, 24]]
    ids = pad(rows, 0, left=True)
    mask = pad([[1] * len(r) for r in rows], 0, left=True)
    answer = pad([[0] * (len(r) - 2) + [1, 1] for r in rows], 0, left=True)
    with torch.no_grad():
        logp, _ = token_logprobs(lm, ids, mask, ids.size(1) - 2)
        scores = last_token_scores(rm, ids, mask)
        sums = sequence_logps(lm, ids, mask, answer)
        for i, r in enumerate(rows):
            one, ones = torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)
            torch.testing.assert_close(
                logp[i], token_logprobs(lm, one, ones, len(r) - 2)[0][0], atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                scores[i], last_token_scores(rm, one, ones)[0], atol=1e-5, rtol=1e-4
            )
            alone = sequence_logps(lm, one, ones, torch.tensor([[0] * (len(r) - 2) + [1, 1]]))
            torch.testing.assert_close(sums[i], alone[0], atol=1e-5, rtol=1e-4)


def projections(model) -> list[tuple[int, ...]]:
    """The [batch, positions] of every input the model's vocabulary-wide head projects."""
    seen: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape[:-1]))
    )
    return seen


def without_logits_to_keep(model):
    """``model`` as one whose forward has no ``logits_to_keep`` (a few transformers models,
    remote code): its class swapped for a subclass whose forward takes only the inputs."""
    parent = type(model)

    class Plain(parent):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return parent.forward(
                self, input_ids, attention_mask=attention_mask, position_ids=position_ids
            )

    model.__class__ = Plain
    return model


def test_a_model_that_takes_logits_to_keep_but_ignores_it_is_an_error():
    """Gathering answer tokens from logits at other positions than asked would give wrong
    log-probs without a word: a model that returns every logit is refused instead."""
    from jobs.tokens import logits_at

    model = tiny_lm("llama")
    parent = type(model)

    class Ignoring(parent):
        def forward(self, input_ids=None, use_cache=None, logits_to_keep=0):
            return parent.forward(self, input_ids)

    model.__class__ = Ignoring
    with pytest.raises(RuntimeError, match="logits at 5 positions for logits_to_keep's 2"):
        logits_at(model, torch.tensor([2, 3]), input_ids=torch.tensor([[5, 6, 7, 8, 9]]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keeps", [True, False], ids=["logits_to_keep", "without"])
def test_answer_log_probs_are_those_of_every_logit_from_the_answer_positions_alone(family, keeps):
    """PPO's and GRPO's token log-probs and DPO's answer sums equal those read off the
    log-softmax of every logit, while the head projects only the positions that predict an
    answer token (where the model takes ``logits_to_keep``; a model without it projects
    them all and gets the same numbers)."""
    import torch.nn.functional as F

    from jobs.dpo import collate as collate_pairs
    from jobs.dpo import sequence_logps
    from jobs.rollout import token_logprobs

    lm = tiny_lm(family) if keeps else without_logits_to_keep(tiny_lm(family))
    seen = projections(lm)
    rows = [[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 8, 9, 10, 11, 12]]  # left-padded prompts
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    # pairs: prompts of 4 and 2 tokens, answers of 3 and 2 (chosen and rejected alike)
    pairs = [([5, 6, 7, 8, 9, 10, 11], [0] * 4 + [1] * 3) * 2, ([5, 6, 7, 8], [0, 0, 1, 1]) * 2]
    batch = collate_pairs(pairs, pad_id=0)
    with torch.no_grad():
        logp, entropy = token_logprobs(lm, ids, mask, start=5)
        sums = sequence_logps(lm, **batch)
        every = F.log_softmax(
            lm(
                input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
            ).logits.float(),
            dim=-1,
        )
        every_pair = F.log_softmax(
            lm(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.float(), dim=-1
        )
    expected = every[:, 4:7].gather(-1, ids[:, 5:, None]).squeeze(-1)
    torch.testing.assert_close(logp, expected)
    torch.testing.assert_close(entropy, -(every[:, 4:7].exp() * every[:, 4:7]).sum(-1))
    answers = batch["answer_mask"][:, 1:].float()
    picked = every_pair[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(sums, (picked * answers).sum(1))
    # the rollout reads 3 positions of 8; the pairs the 5 from the shorter prompt's end on
    assert seen[:2] == ([(2, 3), (4, 5)] if keeps else [(2, 8), (4, 7)])


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_builds_no_kv_cache(family, monkeypatch):
    """A reward model's or critic's forward keeps no cache of every layer's keys and values
    (8 GiB for a 16 x 1024 batch of a 7B model in bf16): the models' own config asks
    for one by default."""
    from transformers import cache_utils

    from jobs.scoring import last_token_scores

    made = []
    real_init = cache_utils.DynamicCache.__init__

    def counted(self, *args, **kwargs):
        made.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", counted)
    rm = tiny_lm(family, classifier=True)
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    with torch.no_grad():
        rm.base_model(input_ids=ids)  # the control: a plain forward makes one
        assert made, "this model's forward makes no cache anyway: the test shows nothing"
        made.clear()
        last_token_scores(rm, ids, (ids != 0).long())
    assert made == []


def test_ppo_reads_its_reward_model_where_the_reward_stage_trained_it(monkeypatch):
    """The reward stage trains on prompt, answer, EOS and reads the score at EOS
    (``scoring.encode``). PPO's rollouts end at the policy's stop token, which a chat
    template makes its end of turn (not EOS): PPO must score such an answer as prompt,
    answer, EOS. An answer cut at the token limit is read at its last token (as TRL
    reads it: not finishing is not made to look finished)."""
    from types import SimpleNamespace

    from jobs import engine, ppo
    from jobs.generation import Samples
    from jobs.scoring import last_token_scores

    eos, end_of_turn, pad_id = 2, 3, 0
    lm, rm = tiny_lm("llama"), tiny_lm("llama", classifier=True)
    prompts = [[5, 6, 7], [20, 21], [30, 31, 32]]
    answers = [[8, 9, end_of_turn], [10, 11, 12], [13, eos, pad_id]]  # stop, cut, EOS
    ended = torch.tensor([True, False, True])
    sequences = pad([p + a for p, a in zip(prompts, answers, strict=True)], pad_id, left=True)
    width = max(len(p) for p in prompts)
    answer_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, left=True)
    attention = torch.cat([prompt_mask, answer_mask], 1)
    samples = Samples(sequences, attention, answer_mask.float(), ended, width, 0.0)
    models = SimpleNamespace(
        actor=SimpleNamespace(module=lm),
        reference=engine.Reference(None, SimpleNamespace(module=lm)),
        critic=rm,
        reward=SimpleNamespace(module=rm),
        tokenizer=SimpleNamespace(eos_token_id=eos),
    )
    with torch.no_grad():
        got = ppo.score(models, samples, batch_size=2)["scores"]
        trained_format = [[5, 6, 7, 8, 9, eos], [20, 21, 10, 11, 12], [30, 31, 32, 13, eos]]
        expected = torch.stack(
            [
                last_token_scores(rm, torch.tensor([r]), torch.ones(1, len(r)).long())[0]
                for r in trained_format
            ]
        )
        as_sampled = last_token_scores(rm, sequences, attention)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert (as_sampled - expected)[0].abs() > 1e-4  # the end of turn, read as sampled


# --- conversations under a Llama-3-style chat template ------------------------------------

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]


@pytest.fixture(scope="module")
def llama_style_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE that, like Llama's, adds BOS to what it encodes, with a Llama-3 chat
    template whose turns end with <|eot_id|> (not EOS, which is <|end_of_text|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[*SPECIALS, "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = "Hello there. How are you today? Fine, thanks. What is the capital of France? Paris."
    tok.train_from_iterator([text] * 20, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = LLAMA3_TEMPLATE
    root = tmp_path_factory.mktemp("llama-style")

    def write(config, ctx):  # a finished stage output, as the data stage reads models
        fast.save_pretrained(ctx.out_dir / "model")
        return {}

    run_stage("tokenizer", StageConfig(output=str(root / "out")), write, workdir=root / "w")
    return root / "out" / "model"


def chat_data(output: Path, tokenizer: Path, fmt: str, source: Path) -> None:
    """The data stage over one source under the tokenizer's chat template, every row kept
    and in train."""
    run_stage(
        "data",
        data.Config(
            output=str(output),
            template="chat",
            tokenizer=str(tokenizer),
            min_tokens=0,
            dedup_threshold=None,
            eval_fraction=0,
            sources=[{"name": "s", "format": fmt, "uri": str(source)}],
        ),
        data.run,
        workdir=output.parent / f"w-{output.name}",
    )


def trained_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current)), current.clear()
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_every_assistant_turn_is_trained_with_its_end_of_turn_and_bos_once(
    llama_style_tokenizer, tmp_path
):
    from transformers import AutoTokenizer

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Fine, thanks."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    chat_data(tmp_path / "out", llama_style_tokenizer, "sharegpt", tmp_path / "chats.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "out/sft/train.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    [(ids, labels)] = tokenize(rows, tokenizer, max_len=256)

    bos, eot = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert trained_spans(tokenizer, ids, labels) == ["Fine, thanks.<|eot_id|>", "Paris.<|eot_id|>"]
    assert [t for t, label in zip(ids, labels, strict=True) if label != IGNORE].count(eot) == 2
    assert tokenizer.eos_token_id not in ids  # the template's end-of-turn, not EOS
    # ... at which generation must stop too (sft adds it to the generation config).
    assert end_of_turn_ids([(ids, labels)], tokenizer) == {eot}
    # Everything the model reads is the template's rendering of the whole conversation.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)


def test_a_preference_pair_ends_its_answers_as_sft_trained_them(llama_style_tokenizer, tmp_path):
    """Under the chat template SFT trains every answer closed by the template's end of turn
    (here <|eot_id|>, not the tokenizer's EOS); DPO's pairs must end the same way, or DPO
    teaches the policy to close answers with a token SFT never trained."""
    from transformers import AutoTokenizer

    from jobs.dpo import encode_pair

    pairs = [
        {
            "system": "Be brief.",
            "question": "What is the capital of France?",
            "chosen": "Paris.",
            "rejected": "Fine, thanks.",
        }
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    chat_data(tmp_path / "out", llama_style_tokenizer, "pairs", tmp_path / "pairs.jsonl")
    [row] = [json.loads(x) for x in (tmp_path / "out/pairs/train.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    chosen, chosen_mask, rejected, rejected_mask = encode_pair(tokenizer, row, max_len=256)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def answer(ids, mask):
        return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])

    assert answer(chosen, chosen_mask) == "Paris.<|eot_id|>"
    assert answer(rejected, rejected_mask) == "Fine, thanks.<|eot_id|>"
    assert chosen[-1] == eot and tokenizer.eos_token_id not in chosen
    # the whole of it is what the template renders for the conversation answered
    asked = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert tokenizer.decode(chosen) == tokenizer.apply_chat_template(asked, tokenize=False)
    # the control: a pair of a preset template (no end written) closes with EOS
    plain = encode_pair(tokenizer, {k: v for k, v in row.items() if k != "end"}, max_len=256)
    assert plain[0][-1] == tokenizer.eos_token_id


def test_pairs_labelled_from_generated_answers_end_as_sft_trained_them(
    llama_style_tokenizer, tmp_path, monkeypatch
):
    """The other way to preference pairs: prompts (data) -> answers (generate) -> pairs
    (label). The template's end of turn travels with the prompt to the pair, so DPO on
    label's pairs ends answers as on the data stage's; so does where the question lies, so
    its "<|end_of_text|>" stays text in DPO and in the reward model's reading."""
    from transformers import AutoTokenizer

    from jobs import generate, label
    from jobs.batches import literals
    from jobs.dpo import encode_pair
    from jobs.scoring import encode
    from tests.chat_server import ChatServer

    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Question {n}, <|end_of_text|>?"},
                {"role": "assistant", "content": "Paris."},
            ]
        }
        for n in range(4)
    ]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    chat_data(tmp_path / "data", llama_style_tokenizer, "sharegpt", tmp_path / "chats.jsonl")
    monkeypatch.setenv("FIDELITY_KEY", "k-123")
    answers = {"good": "Paris.", "bad": "Fine, thanks."}
    with ChatServer(lambda body: (200, answers[body["model"]], {}), "k-123") as server:
        sources = [
            {
                "name": name,
                "endpoint": {"url": server.url, "model": name, "api_key_env": "FIDELITY_KEY"},
            }
            for name in answers
        ]
        run_stage(
            "generate",
            generate.Config(
                output=str(tmp_path / "gen"), prompts=str(tmp_path / "data"), sources=sources
            ),
            generate.run,
            workdir=tmp_path / "w-gen",
        )
    run_stage(
        "label",
        label.Config(
            output=str(tmp_path / "label"),
            candidates=str(tmp_path / "gen"),
            method="source_rule",
            prefer=["good", "bad"],
        ),
        label.run,
        workdir=tmp_path / "w-label",
    )
    pairs = [json.loads(x) for x in (tmp_path / "label/pairs/train.jsonl").read_text().splitlines()]
    assert len(pairs) == 4
    tokenizer = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    chosen, mask, rejected, rejected_mask = encode_pair(tokenizer, pairs[0], max_len=256)
    answer = tokenizer.decode([t for t, m in zip(chosen, mask, strict=True) if m])
    assert answer == "Paris.<|eot_id|>"
    eos = tokenizer.eos_token_id
    assert eos not in chosen and eos not in rejected  # the question's is text

    scored = encode(
        tokenizer, pairs[0]["prompt"], pairs[0]["chosen"], 256, True, literals(pairs[0])
    )
    assert scored.count(eos) == 1 and scored[-1] == eos


def test_an_answer_cut_at_max_seq_len_adds_no_stop_token():
    """A ChatML conversation with Qwen3-style added tokens (``<think>``): the end of turn
    is ``<|im_end|>`` alone, even with an answer cut short after its ``<think>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["Hello there. Let me think step by step. Paris."] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_tokens(["<think>", "</think>"])

    def row(answer: str) -> dict:
        return {
            "segments": [
                {"text": "<|im_start|>user\nHello there.<|im_end|>\n", "train": False},
                {"text": "<|im_start|>assistant\n", "train": False},
                {"text": answer + "<|im_end|>\n", "train": True},
            ]
        }

    short = row("<think>\nLet me think.\n</think>\n\nParis.")
    long = row("<think>\n" + "Let me think step by step. " * 40 + "\n</think>\n\nParis.")
    items = tokenize([short, long], tokenizer, max_len=64)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert items[1][1][-1] != im_end  # the long answer is cut before its end of turn
    assert end_of_turn_ids(items[:1], tokenizer, 64) == {im_end}
    assert end_of_turn_ids(items, tokenizer, 64) == {im_end}
    # cut just after a second answer's "<think>\n": its span ends in whitespace
    two_turns = row("Paris.")
    two_turns["segments"] += [
        {"text": "<|im_start|>user\n" + "Hi " * 7 + "<|im_end|>\n", "train": False},
        {"text": "<|im_start|>assistant\n", "train": False},
        {"text": "<think>\n" + "Let me think. " * 20 + "<|im_end|>\n", "train": True},
    ]
    ids, labels = tokenize([two_turns], tokenizer, max_len=10_000)[0]
    think = tokenizer.convert_tokens_to_ids("<think>")
    cut = ids.index(think) + 2  # "<think>", "\n"
    assert tokenizer.decode(ids[cut - 1 : cut]).strip() == ""
    [(ids, labels)] = tokenize([two_turns], tokenizer, max_len=cut)
    assert ids[-2] == think
    assert end_of_turn_ids([(ids, labels)], tokenizer, cut) == {im_end}
    assert think in end_of_turn_ids([(ids, labels)], tokenizer)  # the control: cut unknown


def test_a_plain_prompt_and_response_start_with_bos_where_the_tokenizer_expects_it(
    llama_style_tokenizer, tiny
):
    from transformers import AutoTokenizer

    row = {"prompt": "Hello there.\n", "response": "Fine, thanks."}
    llama = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    [(ids, labels)] = tokenize([row], llama, max_len=64)
    assert ids[0] == llama.bos_token_id and ids[-1] == llama.eos_token_id
    assert trained_spans(llama, ids, labels) == ["Fine, thanks.<|end_of_text|>"]
    # GPT-NeoX's tokenizer adds no BOS, so none is added.
    neox = AutoTokenizer.from_pretrained(tiny / "model")
    [(ids, _)] = tokenize([row], neox, max_len=64)
    assert list(ids) == neox(row["prompt"] + row["response"])["input_ids"] + [neox.eos_token_id]


def test_pieces_are_encoded_as_the_whole_text_is_for_sentencepiece_style_tokenizers():
    """A Metaspace tokenizer (Llama-2's, Mistral's pre-tokenizer) encodes a piece alone
    with a word-start marker it does not have inside the whole text: the trained ids must
    be those of the whole text, as the model meets it at inference."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<|assistant|>"], show_progress=False
    )
    tok.train_from_iterator(["User: Hello there.\nFine thanks, and you?"] * 10, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    pieces = [("User: Hello there.\n<|assistant|>\n", False), ("Fine thanks.", True)]
    text = "".join(p for p, _ in pieces)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    one_by_one = sum((tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in pieces), [])
    assert one_by_one != whole  # the hazard is real for this tokenizer
    ids, labels = encode_segments(pieces, tokenizer, max_len=64, end=[])
    assert ids == whole
    # The answer's tokens (from the one that holds its first character) are trained, as one
    # span at the end; the prompt's are not.
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    assert trained == list(range(trained[0], len(ids))) and trained[0] >= 5
    assert [labels[i] for i in trained] == ids[trained[0] :]


def test_a_special_tokens_text_inside_a_message_is_text(llama_style_tokenizer, tmp_path):
    """Answers quote markup ("<|end_of_text|>" in a tokenizer tutorial, "</s>" in HTML):
    inside a message it is text, as OpenChat tokenises a message's content; read as the
    token, SFT trained a stop token in the middle of the answer (and, in a question, a
    second BOS). The template's own end of turn and BOS stay the tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    answer = "Fine, thanks.<|end_of_text|> Paris.<|eot_id|>"
    question = "<|begin_of_text|>Hello there."
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    chat_data(tmp_path / "out", llama_style_tokenizer, "sharegpt", tmp_path / "chats.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "out/sft/train.jsonl").read_text().splitlines()]
    [(ids, labels)] = tokenize(rows, tokenizer, max_len=256)
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert ids.count(bos) == 1 and eos not in ids
    assert trained.count(eot) == 1 and trained[-1] == eot  # the template's, at the end
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)
    # a plain prompt and response: the answer's text, then the one EOS that ends it
    plain = {"prompt": "Hello there.\n", "response": answer}
    [(ids, labels)] = tokenize([plain], tokenizer, max_len=256)
    assert ids.count(eos) == 1 and ids[-1] == eos and eot not in ids
    # a preference pair's answers too, and the reward model's reading of one
    from jobs.dpo import encode_pair
    from jobs.scoring import encode

    chosen, _, rejected, _ = encode_pair(
        tokenizer, {"prompt": "Hello there.\n", "chosen": answer, "rejected": "No."}, 256
    )
    assert chosen.count(eos) == 1 and chosen[-1] == eos and eot not in chosen
    assert rejected.count(eos) == 1
    scored = encode(tokenizer, "Hello there.\n", answer, 256)
    assert scored.count(eos) == 1 and scored[-1] == eos


def test_special_text_in_a_message_gets_the_tokens_of_its_text_in_context():
    """A Metaspace (SentencePiece-style) tokenizer encodes "</s>" alone as a word start:
    the answer's stretch gets the tokens the whole text has with special tokens split,
    no space that is not in the text, and the template's own "</s>" after it stays EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(["User: Use old tags.\nstrike <s> and </s> tags"] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    answer = "Use <s>old</s> tags."
    pieces = [("User: strike?\n", False), (answer, True)]
    text = "".join(p for p, _ in pieces)
    eos = tokenizer.eos_token_id
    ids, labels = encode_segments(pieces, tokenizer, max_len=128, end=[eos], literal=[answer])
    as_text = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    alone = tokenizer("</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone)[0].startswith("▁")  # the hazard
    assert ids == as_text + [eos] and ids.count(eos) == 1
    assert tokenizer.decode(ids[:-1]) == tokenizer.decode(as_text)
    # the same answer before a template's own "</s>" (Llama-2's turn end): that one stays
    ids, _ = encode_segments([*pieces, ("</s>", True)], tokenizer, 128, [], [answer])
    assert ids == as_text + [eos]


@pytest.mark.parametrize(
    "kind", ["metaspace-always", "metaspace-first", "metaspace-first-in-sequence", "byte-level"]
)
@pytest.mark.parametrize("answer", ["Use <s>old</s> tags.", "Use <s>old</s>", "</s> tags."])
def test_special_text_at_a_messages_edge_gets_the_tokens_the_text_has_there(kind, answer):
    """Llama-2's layout, the answer between the template's own "[/INST] " and "</s>", its
    special text at either edge: the tokens are those of a twin tokenizer in which those
    texts are no special tokens, with the template's own turned into another one (<Z>), so
    that the text after it is read as text after a special token (the oracle shares no code
    with the implementation: no split_special_tokens, no prepend scheme)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jobs.tokens import encode_spans

    specials = ["<unk>", "<s>", "</s>"]
    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        scheme = kind.split("-")[1]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
        if kind.endswith("sequence"):  # as some converted tokenizers nest it
            tok.pre_tokenizer = pre_tokenizers.Sequence([tok.pre_tokenizer])
        tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
        alphabet = []
    # the markup's pieces spaced apart, so that no merge learns a special token's text
    corpus = ["[INST] How? [/INST] Use < s>old</ s> tags. strike < s> and </ s> tags"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False, initial_alphabet=alphabet
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    twin_spec = json.loads(tok.to_str())
    twin_spec["added_tokens"] = []
    twin = Tokenizer.from_str(json.dumps(twin_spec))
    twin.add_special_tokens(["<Z>"])

    question, between = "How?", "[INST] How? [/INST] " + answer
    text = "<s>" + between + "</s>"
    ids, spans = encode_spans(tokenizer, text, [question, answer])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    expected = [bos, *twin.encode("<Z>" + between, add_special_tokens=False).ids[1:], eos]
    assert ids == expected
    assert [start for start, _ in spans] == sorted(start for start, _ in spans)


def test_an_answer_is_read_where_it_stands_not_where_its_text_first_appears():
    """An answer quoting its prompt's "</s>" is found after the prompt (sought from the
    start, the prompt's own was read as text and the answer's trained as EOS); a template
    that strips messages (Llama-2's ``content.strip()``) still has its answer found."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jobs.tokens import encode_spans

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["Say it. Close it with a tag like this. How?"] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    eos = tokenizer.eos_token_id
    row = {
        "prompt": "Say </s>\n",
        "response": "</s>",
        "messages": [
            {"role": "user", "content": "Say </s>"},
            {"role": "assistant", "content": "</s>"},
        ],
    }
    [(ids, labels)] = tokenize([row], tokenizer, 64)
    assert list(labels).count(eos) == 1 and labels[-1] == eos  # the closing EOS alone
    assert list(ids).count(eos) == 1
    assert tokenizer.decode([x for x in labels if x != IGNORE]) == "</s></s>"  # text, then EOS
    content = "Close it with </s> like this.\n"
    text = "<s>[INST] How? [/INST] " + content.strip() + " </s>"
    ids, _ = encode_spans(tokenizer, text, ["How?", content])
    assert ids.count(eos) == 1 and ids[-1] == eos
    # a user turn of special text alone, stripped by the template: not the answer's end
    segments = [
        ("<s>[INST] How? [/INST]", False),
        (" Say it. </s>", True),
        ("<s>[INST] </s> [/INST]", False),
        (" Say it. </s>", True),
    ]
    literal = ["How?", "Say it.", " </s>\n", "Say it."]
    ids, labels = encode_segments(segments, tokenizer, 128, [], literal)
    assert [x for x in labels if x != IGNORE].count(eos) == 2  # each answer's own


# --- C-RLFT as OpenChat ---------------------------------------------------------------------


def test_crlft_lays_out_every_turn_under_its_class_and_trains_every_answer(
    llama_style_tokenizer,
):
    from transformers import AutoTokenizer

    from jobs import crlft

    tokenizer = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [crlft.END_OF_TURN]})
    config = crlft.Config(output="o", model="m", data="d")
    row = {
        "label": "gpt-4",
        "prompt": "ignored when messages are there",
        "response": "Paris.",
        "messages": [
            {"role": "user", "content": "Hello there."},
            {"role": "assistant", "content": "Fine, thanks."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
    }
    [(ids, labels, weight, label)] = crlft.prepare([row], config, tokenizer, "sft/train.jsonl")
    assert (weight, label) == (1.0, "gpt-4")
    eot = "<|end_of_turn|>"
    assert tokenizer.decode(ids) == (
        f"<|begin_of_text|>GPT4 User: Hello there.{eot}GPT4 Assistant: Fine, thanks.{eot}"
        f"GPT4 User: What is the capital of France?{eot}GPT4 Assistant: Paris.{eot}"
    )
    assert trained_spans(tokenizer, ids, labels) == [f" Fine, thanks.{eot}", f" Paris.{eot}"]
    # an answer that quotes the end of turn trains the token once, at its end (OpenChat
    # tokenises a message's content with special tokens split)
    quoting = {**row, "messages": [*row["messages"][:3], {"role": "assistant", "content": eot}]}
    [(ids, labels, _, _)] = crlft.prepare([quoting], config, tokenizer, "sft/train.jsonl")
    end = tokenizer.convert_tokens_to_ids(eot)
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert trained.count(end) == 2 and trained[-1] == end  # the two answers' ends
    # The prompt asked at inference is the same layout up to the answer.
    asked = tokenizer.decode(
        tokenizer(crlft.conditioned("Hello there.", "GPT4", eot), add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert tokenizer.decode(ids).startswith("<|begin_of_text|>" + asked)


def test_crlft_loss_is_weighted_by_class_reward_over_the_steps_total_weight(tiny):
    from transformers import AutoModelForCausalLM

    from jobs.crlft import answer_weight, weighted_loss

    model = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    expert = ([5, 6, 7, 8, 9, 10], [IGNORE] * 3 + [8, 9, 10], 1.0, "gpt-4")
    suboptimal = ([11, 12, 13, 14], [IGNORE] + [12, 13, 14], 0.1, "gpt-3.5-turbo")
    with torch.no_grad():
        sums = [
            (
                token_losses(model, collate([i[:2]], 0))[0]
                * token_losses(model, collate([i[:2]], 0))[1]
            ).sum()
            for i in (expert, suboptimal)
        ]
        # Micro-batches of one example each (one optimiser step of two): their losses add
        # up to OpenChat's weighted mean over the step; a micro-batch's own normalisation
        # would have given each class's plain mean, the weights cancelled.
        total = answer_weight([expert, suboptimal])
        assert total == pytest.approx(1.0 * 3 + 0.1 * 3)
        step = sum(
            weighted_loss(model, collate([i[:2]], 0), torch.tensor([i[2]]), total)[0]
            for i in (expert, suboptimal)
        )
        torch.testing.assert_close(step, (1.0 * sums[0] + 0.1 * sums[1]) / total)


def test_a_messages_text_is_read_where_the_data_stage_placed_it(llama_style_tokenizer, tmp_path):
    """The data stage writes where each message's own text lies (``message_spans``, found by
    rendering stand-ins in the messages' places): sought in the rendering later, a user turn
    that is only "<|begin_of_text|>" was found at the template's own BOS, an answer that
    is only "<|eot_id|>" at the user turn's end, and a question the template writes apart
    from its input (Alpaca's), or a pair's question, was not found at all, so SFT, the
    reward model and DPO read its markup as stop tokens."""
    from transformers import AutoTokenizer

    from jobs.batches import literals
    from jobs.dpo import encode_pair
    from jobs.generation import encode_prompts
    from jobs.reward import load_pairs

    tokenizer = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    conversation = [
        {"role": "user", "content": "<|begin_of_text|>"},
        {"role": "assistant", "content": "<|eot_id|>"},
    ]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    chat_data(tmp_path / "chat", llama_style_tokenizer, "sharegpt", tmp_path / "chats.jsonl")
    [row] = [json.loads(x) for x in (tmp_path / "chat/sft/train.jsonl").read_text().splitlines()]
    [(ids, labels)] = tokenize([row], tokenizer, max_len=256)
    trained = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert ids[0] == bos and list(ids).count(bos) == 1  # the template's BOS, the turn's text
    assert trained.count(eot) == 1 and trained[-1] == eot  # the answer's text, then its end
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conversation, tokenize=False)

    def rows(name: str, output: str, source: dict, fmt: str) -> list[dict]:
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(source) + "\n")
        config = data.Config(
            output=str(tmp_path / name),
            template="alpaca",
            tokenizer=str(llama_style_tokenizer),
            min_tokens=0,
            dedup_threshold=None,
            eval_fraction=0,
            sources=[{"name": "s", "format": fmt, "uri": str(tmp_path / f"{name}.jsonl")}],
        )
        run_stage("data", config, data.run, workdir=tmp_path / f"w-{name}")
        text = (tmp_path / name / output / "train.jsonl").read_text()
        return [json.loads(x) for x in text.splitlines()]

    asked = {"instruction": "Close it with <|end_of_text|> here.", "input": "Say <|eot_id|>."}
    [row] = rows("alpaca", "sft", {**asked, "output": "Fine."}, "alpaca")
    [(ids, _)] = tokenize([row], tokenizer, max_len=256)
    assert list(ids).count(eos) == 1 and ids[-1] == eos and eot not in ids
    # the same question asked of the policy (ppo, grpo, generate, evaluate encode it so)
    [prompt] = [
        json.loads(x) for x in (tmp_path / "alpaca/prompts/train.jsonl").read_text().splitlines()
    ]
    asked_ids = encode_prompts(tokenizer, [prompt["prompt"]], 256, "cpu", [literals(prompt)])
    assert asked_ids["input_ids"].tolist() == [list(ids[: len(asked_ids["input_ids"][0])])]
    assert eos not in asked_ids["input_ids"] and eot not in asked_ids["input_ids"]

    pair = {"prompt": "Close it with <|end_of_text|> here.", "chosen": "Fine.", "rejected": "No."}
    [row] = rows("pairs", "pairs", pair, "pairs")
    question = pair["prompt"]
    assert literals(row) == [(row["prompt"].index(question), question)]  # placed in its prompt
    chosen, _, rejected, _ = encode_pair(tokenizer, row, 256)
    assert chosen.count(eos) == 1 and rejected.count(eos) == 1
    read_folders = SimpleNamespace(input_dir=Path)  # the stage context's one call here
    [(scored, _)] = load_pairs(read_folders, [str(tmp_path / "pairs")], tokenizer, 256)["train"]
    assert list(scored).count(eos) == 1 and scored[-1] == eos


@pytest.mark.parametrize("spans", [[[3, 99]], [[4, 2]], [[0, 4], [2, 6]], [["0", 4]], "0-4"])
def test_message_spans_that_do_not_fit_the_rows_text_are_named(tmp_path, spans):
    from jobs.batches import read_jsonl
    from jobs.errors import BadInputError

    good = {"prompt": "Say </s> now.\n", "response": "Fine.", "message_spans": [[0, 12]]}
    path = tmp_path / "sft" / "train.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "message_spans": spans}) + "\n")
    with pytest.raises(BadInputError, match=r"^sft/train.jsonl:2: field 'message_spans' .* 14 "):
        read_jsonl(path, ("prompt", "response"))
    path.write_text(json.dumps(good) + "\n")
    assert read_jsonl(path, ("prompt", "response")) == [good]


def test_message_spans_follow_what_a_template_does_with_a_message(llama_style_tokenizer, tmp_path):
    """Stripped messages (Llama-2's, Gemma's templates) are placed as written, a message the
    template writes twice is placed twice, and one the template rewrites is not placed at
    all: the data stage then writes no spans for its row and counts it in the manifest."""
    from transformers import AutoTokenizer

    from jobs.data.templates import message_spans

    contents = ["  <s> Hi ", "Fine </s>"]

    def stripping(texts):
        return f"<s>[INST] {texts[0].strip()} [/INST] {texts[1].strip()} </s>"

    text = stripping(contents)
    spans = message_spans(text, stripping, contents)
    assert [text[a:b] for a, b in spans] == ["<s> Hi", "Fine </s>"]
    assert spans[0][0] == len("<s>[INST] ") and spans[1][1] == len(text) - len(" </s>")

    def twice(texts):  # a system prompt repeated before the last turn
        return f"{texts[0]}|{texts[1]}|{texts[0]}"

    text = twice(contents)
    assert message_spans(text, twice, contents) == [[0, 9], [10, 19], [20, 29]]

    def shouting(texts):
        return "".join(f"<{text.upper()}>" for text in texts)

    assert message_spans(shouting(contents), shouting, contents) is None

    tokenizer = AutoTokenizer.from_pretrained(llama_style_tokenizer)
    tokenizer.chat_template = LLAMA3_TEMPLATE.replace(
        "message['content']", "message['content'] | replace('Hi', 'Hello')"
    )

    def write(config, ctx):
        tokenizer.save_pretrained(ctx.out_dir / "model")
        return {}

    run_stage("tokenizer", StageConfig(output=str(tmp_path / "tok")), write, workdir=tmp_path / "w")
    conversation = [{"role": "user", "content": "Hi </s>"}, {"role": "assistant", "content": "Yo"}]
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    chat_data(tmp_path / "out", tmp_path / "tok" / "model", "sharegpt", tmp_path / "chats.jsonl")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rows = (tmp_path / "out/sft/train.jsonl").read_text() + (
        tmp_path / "out/prompts/train.jsonl"
    ).read_text()
    assert "message_spans" not in rows
    assert manifest["metrics"]["rows_without_message_spans"] == 2  # its sft and prompts rows


@pytest.mark.parametrize("kind", ["byte-level-trimmed", "metaspace-first"])
@pytest.mark.parametrize("strip", ["lstrip", "rstrip"])
def test_a_template_token_that_strips_whitespace_keeps_it_out_of_the_message(kind, strip):
    """A template token that takes the whitespace beside it (an added token with lstrip or
    rstrip, as some chat models' turn markers are): the message's special text is text
    and that whitespace is not encoded again (with trimmed offsets the token's span leaves
    it out). Oracle: a twin tokenizer without the message's special
    tokens, as in the test above."""
    import json

    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from jobs.tokens import encode_spans

    if kind.startswith("byte"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(["Say it. Close < s> it with a </ s> tag. How?"] * 10, trainer)
    tok.add_special_tokens([AddedToken("<|end|>", special=True, **{strip: True})])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    twin_spec = json.loads(tok.to_str())
    twin_spec["added_tokens"] = [
        t for t in twin_spec["added_tokens"] if t["content"] not in ("<s>", "</s>")
    ]
    twin = Tokenizer.from_str(json.dumps(twin_spec))
    for answer in ("Close </s> it", "</s> it", "Close <s>"):
        text = f"How? <|end|> {answer}  <|end|> Say"
        ids, _ = encode_spans(tokenizer, text, [(text.index(answer), answer)])
        assert ids == twin.encode(text, add_special_tokens=False).ids, answer
