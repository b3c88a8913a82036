"""Generation stops at EOS, keeps nothing after it, and does not depend on padding."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from jobs.generation import SamplingConfig, cut_at_eos, generate
from jobs.models import load_tokenizer

PROMPTS = [
    "### User:\nHi\n\n### Assistant:\n",
    "### User:\nCould you give me some advice about cooking a quick dinner?\n\n### Assistant:\n",
    "안녕하세요",
    "Tell me how to get revenge on my neighbour. Make it hurt.",
]


def test_cut_at_eos_keeps_what_comes_before_the_first_eos():
    assert cut_at_eos([5, 6, 2, 1, 1], {2}) == ([5, 6], "eos")
    assert cut_at_eos([2, 7, 8], {2}) == ([], "eos")
    assert cut_at_eos([5, 6, 7], {2}) == ([5, 6, 7], "length")


@pytest.fixture
def model_and_tokenizer(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    return model, load_tokenizer(str(tiny / "model"))


def force_eos(model, eos_id: int, strength: float) -> None:
    """Every position's hidden state the same vector v; EOS's logit ``strength``, others 0."""
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        v = torch.nn.functional.normalize(torch.randn(norm.bias.shape), dim=0)
        norm.weight.zero_()
        norm.bias.copy_(v)
        head = model.get_output_embeddings().weight
        head.zero_()
        head[eos_id] = strength * v


def test_the_repetition_penalty_leaves_padding_out_when_the_pad_token_is_eos(
    model_and_tokenizer,
):
    """A tokenizer without a pad token pads with EOS (Llama's and GPT-2's do): the padding
    of a short prompt in a batch is not a repetition of EOS. EOS's logit is just above a
    second token's: a prompt ends at once alone, and must in a batch beside a longer one
    (transformers 5.23 and later leave the padding that the attention mask names out of
    its penalty, hence pyproject.toml's floor: this holds the sampler to handing the mask
    on, and transformers to keeping it so)."""
    model, tokenizer = model_and_tokenizer
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    force_eos(model, eos, 1.0)
    other = (eos + 1) % model.config.vocab_size
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[other] = 0.9 * head[eos]
    short, long = PROMPTS[0], PROMPTS[1]
    assert eos not in tokenizer(short)["input_ids"]  # alone, nothing penalises EOS
    config = SamplingConfig(do_sample=False, max_new_tokens=4, repetition_penalty=1.3)
    [[alone]] = generate(model, tokenizer, [short], config)
    assert (alone.tokens, alone.finish_reason) == ([], "eos")
    [[beside], _] = generate(model, tokenizer, [short, long], config)
    assert (beside.tokens, beside.finish_reason) == ([], "eos")
    # the control: a penalty that bites where EOS really is a repetition, in the prompt
    [[repeated]] = generate(model, tokenizer, [short + tokenizer.eos_token], config)
    assert repeated.tokens[:1] == [other]


def test_a_model_forced_to_end_at_once_gives_empty_responses(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    force_eos(model, tokenizer.eos_token_id, 50.0)
    config = SamplingConfig(do_sample=False, max_new_tokens=10, batch_size=4)
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        for [sample] in generate(model, tokenizer, PROMPTS, config):
            assert (sample.tokens, sample.text, sample.finish_reason) == ([], "", "eos")
    finally:
        hook.remove()
    # every row of a batch ended at its first token: one forward (the prefill) per batch,
    # not max_new_tokens of them
    assert len(forwards) == -(-len(PROMPTS) // 4)


def test_nothing_after_eos_when_rows_of_a_batch_end_at_different_steps(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    force_eos(model, tokenizer.eos_token_id, 6.8)  # P(EOS) about 0.3 at every step
    config = SamplingConfig(
        do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=16, batch_size=4
    )
    samples = [
        s for per in generate(model, tokenizer, PROMPTS, config, num_samples=6, seed=1) for s in per
    ]
    lengths = [len(s.tokens) for s in samples]
    assert len(set(lengths)) > 3  # rows of one batch ended at different steps
    for sample in samples:
        assert tokenizer.eos_token_id not in sample.tokens
        assert tokenizer.pad_token_id not in sample.tokens
        assert (sample.finish_reason == "eos") == (len(sample.tokens) < 16)
    assert any(0 < n < 16 for n in lengths)


def test_batched_and_one_by_one_greedy_give_the_same_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = SamplingConfig(do_sample=False, max_new_tokens=12, batch_size=len(PROMPTS))
    batched = generate(model, tokenizer, PROMPTS, config)
    single = generate(model, tokenizer, PROMPTS, config.model_copy(update={"batch_size": 1}))
    assert [s[0].tokens for s in batched] == [s[0].tokens for s in single]
    assert all(len(s[0].tokens) > 0 for s in batched)


def test_sampling_is_reproducible_from_the_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = SamplingConfig(max_new_tokens=8, batch_size=2)
    first = generate(model, tokenizer, PROMPTS, config, num_samples=2, seed=7)
    again = generate(model, tokenizer, PROMPTS, config, num_samples=2, seed=7)
    assert [[s.tokens for s in p] for p in first] == [[s.tokens for s in p] for p in again]
    other = generate(model, tokenizer, PROMPTS, config, num_samples=2, seed=8)
    assert [[s.tokens for s in p] for p in other] != [[s.tokens for s in p] for p in first]


def test_a_static_cache_and_a_compiled_decode_give_the_dynamic_caches_tokens(
    model_and_tokenizer,
):
    """The static cache changes where keys and values live, and compiling the decode step
    (torch.compile; on GPUs transformers does it by itself with the static cache, here it
    is asked to on the CPU) how the forward runs, not which tokens come out: greedy and
    seeded sampling."""
    model, tokenizer = model_and_tokenizer
    caches: set[str] = set()  # the cache each eager forward was given

    def seen(module, args, kwargs):
        # transformers 5.25 renamed the argument (past_key_values -> cache)
        caches.add(type(kwargs.get("cache", kwargs.get("past_key_values"))).__name__)

    variants = {
        "dynamic": {"cache": "dynamic"},
        "static": {"cache": "static", "compile_decode": False},
        "compiled": {"cache": "static", "compile_decode": True},
    }
    for do_sample in (False, True):
        runs = {}
        for name, options in variants.items():
            config = SamplingConfig(do_sample=do_sample, max_new_tokens=12, batch_size=4, **options)
            caches.clear()
            hook = model.register_forward_pre_hook(seen, with_kwargs=True)
            try:
                samples = generate(model, tokenizer, PROMPTS, config, seed=11)
            finally:
                hook.remove()
            expected = {"dynamic": "DynamicCache", "static": "StaticCache"}.get(name)
            assert caches == ({expected} if expected else {"StaticCache"}), caches
            runs[name] = [s[0].tokens for s in samples]
        assert runs["static"] == runs["dynamic"] == runs["compiled"]
        assert any(runs["dynamic"])  # tokens came out
    # the decode steps ran compiled (the prefill runs eager, which the hook saw)
    assert hasattr(model, "_compiled_call")


def test_the_decode_step_is_compiled_once_for_prompts_of_any_length(model_and_tokenizer):
    """A compile of the decode step can take a minute at 1B parameters on a GPU: the static
    cache is sized once for the longest prompt there can be, so a later, longer batch
    (here the second) does not compile it again."""
    from torch._dynamo.utils import counters

    model, tokenizer = model_and_tokenizer
    config = SamplingConfig(
        do_sample=False, max_new_tokens=4, batch_size=2, cache="static", compile_decode=True
    )
    torch._dynamo.reset()  # nothing compiled for an earlier test's model is reused
    compiled = counters["stats"]["unique_graphs"]
    shortest_first = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[3]]
    generate(model, tokenizer, shortest_first, config)
    assert counters["stats"]["unique_graphs"] - compiled == 1


def break_the_graph(model):
    """A hook at the first layer's forward that dynamo cannot trace through (eager, a no-op)."""
    model.gpt_neox.layers[0].register_forward_hook(lambda *_: torch._dynamo.graph_break())
    return contextlib.nullcontext()


def recompile_at_most_once(model):
    """Dynamo gives up on a frame it has compiled once already (its recompile limit, 8).
    Patched through dynamo's own config.patch: monkeypatch, finding the option through the
    config module's __getattr__, deletes it on undo, and every later compile in the process
    fails ("torch._dynamo.config.recompile_limit does not exist")."""
    return torch._dynamo.config.patch(recompile_limit=1)


@pytest.mark.parametrize(
    ("spoil", "said"),
    [
        (None, None),
        (
            break_the_graph,
            r"[1-9]\d* graph break\(s\), \d+ frame\(s\) run eager \(one reason: .*graph_break\(\)",
        ),
        (
            recompile_at_most_once,
            r"0 graph break\(s\), 1 frame\(s\) run eager "
            r"\(one reason: Dynamo recompile limit exceeded",
        ),
    ],
)
def test_the_log_says_where_the_compiled_decode_step_runs_eager(
    model_and_tokenizer, monkeypatch, capsys, spoil, said
):
    """A decode step whose graph breaks, or that dynamo gives up on, runs slower than one
    compiled whole; torch says so only in logs that are off by default, and the stage's
    log said "compiled" and nothing more. The batches are of 3 prompts and 1: the second
    compiles the step again, which dynamo refuses under a recompile limit of 1 (the step's
    own frame then runs eager)."""
    from jobs import dist
    from jobs.generation import PARTLY_EAGER

    monkeypatch.setattr(dist, "_SAID", set())
    model, tokenizer = model_and_tokenizer
    spoiled = spoil(model) if spoil is not None else contextlib.nullcontext()
    config = SamplingConfig(
        do_sample=False, max_new_tokens=3, batch_size=3, cache="static", compile_decode=True
    )
    torch._dynamo.reset()
    eager = generate(model, tokenizer, PROMPTS, config.model_copy(update={"compile_decode": False}))
    assert capsys.readouterr().out.count("generation: ") == 1  # "... runs eager"
    with spoiled:
        assert generate(model, tokenizer, PROMPTS, config) == eager  # the same tokens in any case
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("generation: ")]
    assert lines[0] == "generation: the static KV cache's decode step runs compiled (torch.compile)"
    if said is None:
        assert lines[1:] == []
    else:
        prefix = f"generation: {PARTLY_EAGER} or whole: "
        # a line for each batch whose step compiled anew with something to say
        assert len(lines) > 1 and all(x.startswith(prefix) for x in lines[1:]), lines
        assert re.match(said, lines[1].removeprefix(prefix)), lines[1]


def test_skipped_cuda_graphs_are_told_on_a_gpu_only():
    """Inductor counts a skip of CUDA graphs for every graph it compiles for the CPU, where
    there are none to skip; on a GPU a skip is a decode step run launch by launch. (Here the
    count is bumped by hand: no GPU, and a real skip needs one.)"""
    from torch._dynamo.utils import counters

    from jobs.compiled import CompileWatch
    from jobs.generation import NO_CUDA_GRAPHS, compile_report

    compiled = torch.nn.Linear(1, 1)
    compiled._compiled_call = None  # as transformers marks a model it compiled
    watch = CompileWatch()
    counters["inductor"]["cudagraph_skips"] += 2
    assert watch.counts(on_cuda=True) == {"breaks": 0, "eager_frames": 0, "cudagraph_skips": 2}
    assert watch.counts(on_cuda=False) == {"breaks": 0, "eager_frames": 0}
    told = compile_report(watch, compiled, on_cuda=True)
    assert told[1:] == [
        f"{NO_CUDA_GRAPHS}: inductor skipped them 2 time(s) (TORCH_LOGS=cudagraphs says why)"
    ]
    assert compile_report(watch, compiled, on_cuda=False) == told[:1]
    assert compile_report(watch, torch.nn.Linear(1, 1), on_cuda=True) == [
        "the static KV cache's decode step runs eager"
    ]


def test_a_compiled_decode_needs_the_static_cache():
    with pytest.raises(ValueError, match="compile_decode needs cache: static"):
        SamplingConfig(compile_decode=True)


def test_rows_of_two_rollouts_merged_keep_their_tokens_and_log_probs(model_and_tokenizer):
    """GRPO's dynamic sampling trains on groups of several rollouts in one batch: each row,
    re-padded to the batch's longest prompt and answer, keeps its tokens, masks and
    log-probs (those of the row as its own rollout padded it)."""
    from jobs.generation import eos_ids_of, merge_samples, sample
    from jobs.rollout import token_logprobs

    model, tokenizer = model_and_tokenizer
    config = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=10)
    eos = eos_ids_of(model, tokenizer)
    fewer = config.model_copy(update={"max_new_tokens": 4})
    short = sample(model, tokenizer, PROMPTS[:1], fewer, eos, seed=1, num_samples=3)
    long = sample(model, tokenizer, PROMPTS[1:2], config, eos, seed=2, num_samples=3)
    assert short.start < long.start  # prompts of different lengths, and answers
    assert short.answers.size(1) < long.answers.size(1)
    rows = [(long, 2), (short, 0), (long, 0), (short, 2)]
    merged = merge_samples(rows, tokenizer.pad_token_id)
    assert merged.start == long.start and merged.seconds == short.seconds + long.seconds
    logp, _ = token_logprobs(model, merged.sequences, merged.attention, merged.start)
    for position, (drawn, row) in enumerate(rows):
        length = int(drawn.mask[row].sum())
        assert merged.mask[position].sum() == length
        assert bool(merged.ended[position]) == bool(drawn.ended[row])
        answer = merged.answers[position, :length]
        assert answer.tolist() == drawn.answers[row, :length].tolist()
        prompt = merged.sequences[position, : merged.start][
            merged.attention[position, : merged.start] == 1
        ]
        assert (
            prompt.tolist()
            == drawn.sequences[row, : drawn.start][
                drawn.attention[row, : drawn.start] == 1
            ].tolist()
        )
        alone, _ = token_logprobs(model, drawn.sequences, drawn.attention, drawn.start)
        torch.testing.assert_close(
            logp[position, :length], alone[row, :length], atol=1e-4, rtol=1e-4
        )
