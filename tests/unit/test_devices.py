"""Device and precision mistakes caught on a CPU machine: PyTorch's meta device raises where
a function makes a tensor on the CPU and mixes it with the model's, as CUDA would; models
for sampling and scoring go where and in what precision the config says; PPO's scoring runs
without dropout, in micro-batches, and its EMA stays float32 on one device."""

from __future__ import annotations

import os
import traceback
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from jobs import dist, engine, ppo, rollout
from jobs.errors import BadInputError
from jobs.models import InferenceConfig, load_causal_lm

META = torch.device("meta")


def test_gae_and_reward_shaping_stay_on_the_device_of_their_inputs():
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    advantages, returns = ppo.gae(rewards.to(META), values.to(META), mask.to(META), 1.0, 0.95)
    assert advantages.device == returns.device == META
    batch = {"mask": mask.to(META), "old_logp": values.to(META), "ref_logp": values.to(META)}
    assert ppo.shape_rewards(batch, torch.ones(3, device=META), 0.1).device == META


def test_gae_and_reward_shaping_give_the_numbers_worked_out_by_hand():
    """Schulman et al.'s GAE with gamma 0.9 and lambda 0.8 over a 3-token answer (the 4th
    position is padding), as DeepSpeed-Chat's get_advantages_and_returns computes it:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lambda A_{t+1}, returns A + V."""
    rewards = torch.tensor([[0.1, 0.2, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = ppo.gae(rewards, values, mask, 0.9, 0.8)
    # A2 = 1.0 - 0.3; A1 = (0.2 + 0.9 * 0.3 - 0.4) + 0.72 * A2;
    # A0 = (0.1 + 0.9 * 0.4 - 0.5) + 0.72 * A1
    torch.testing.assert_close(advantages, torch.tensor([[0.37328, 0.574, 0.7, 0.0]]))
    torch.testing.assert_close(returns[:, :3], torch.tensor([[0.87328, 0.974, 1.0]]))

    # the per-token reward: -0.1 * (log pi - log pi_ref), the score 2.0 on the last answer token
    batch = {
        "mask": mask,
        "old_logp": torch.tensor([[-1.0, -2.0, -3.0, 0.0]]),
        "ref_logp": torch.tensor([[-1.5, -1.0, -3.0, 0.0]]),
    }
    shaped = ppo.shape_rewards(batch, torch.tensor([2.0]), 0.1)
    torch.testing.assert_close(shaped, torch.tensor([[-0.05, 0.1, 2.0, 0.0]]))


def test_entropy_is_a_metric_without_a_graph(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny / "model"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    logp, entropy = rollout.token_logprobs(model, ids, torch.ones_like(ids), 4)
    assert logp.requires_grad and not entropy.requires_grad
    assert logp.shape == entropy.shape == (2, 8)


def test_the_ema_is_float32_on_its_device_and_returns_there_after_a_resume():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = ppo.ExponentialAverage(model.state_dict(), 0.999, "cpu")
    assert {v.dtype for v in ema.weights.values()} == {torch.float32}
    before = ema.weights["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(3):  # in bf16 an average with decay 0.999 would not move by 0.003
        ema.update(model)
    assert torch.allclose(
        ema.weights["weight"] - before, torch.full_like(before, 0.002997), atol=2e-5
    )

    # A checkpoint's client state comes back on the CPU (or wherever it was saved).
    resumed = ppo.ExponentialAverage(ema.weights, 0.999, META)
    assert {v.device for v in resumed.weights.values()} == {META}
    resumed.update(model.to(META))  # the actor lives on that device: no device mix


def test_frozen_models_accept_only_what_deepspeed_supports(tiny):
    base = {"output": "o", "actor": "a", "reward_model": "r", "prompts": "p"}
    ppo.Config(**base, frozen_zero_stage=3, frozen_offload=True)
    ppo.Config(**base, frozen_zero_stage=0)
    with pytest.raises(ValidationError, match="frozen_zero_stage"):
        ppo.Config(**base, frozen_zero_stage=2)
    with pytest.raises(ValidationError, match="zero_stage 0 with offload True is not supported"):
        ppo.Config(**base, frozen_offload=True)


def test_a_lora_critic_gives_values(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    critic = AutoModelForSequenceClassification.from_pretrained(str(tiny / "model"), num_labels=1)
    plain_values = ppo.token_values(critic, torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4), 1)
    lora = get_peft_model(critic, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    values = ppo.token_values(lora, torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4), 1)
    assert values.shape == (1, 3)
    torch.testing.assert_close(values, plain_values)  # LoRA's B starts at zero


def test_inference_models_go_where_the_config_says(tiny, monkeypatch):
    assert InferenceConfig().torch_device() == torch.device("cpu")  # no GPU here
    assert InferenceConfig().torch_dtype(torch.device("cpu")) == torch.float32
    assert InferenceConfig().torch_dtype(torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(BadInputError, match="cuda asked for, but this node has no GPU"):
        InferenceConfig(device="cuda").torch_device()

    model = load_causal_lm(str(tiny / "model"), InferenceConfig(precision="bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert InferenceConfig().torch_device() == torch.device("cuda", 1) == dist.device()
    assert InferenceConfig(device="cpu").torch_device() == torch.device("cpu")


def one_process(monkeypatch) -> None:
    """The variables torchrun gives one process, for DeepSpeed's process group. They go when
    the test ends: stages run later as subprocesses would inherit this process's (busy)
    rendezvous port."""
    from tests.conftest import free_port

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


def an_actor(path: str, stage: int):
    """A causal LM's training engine under ZeRO ``stage``, as PPO's actor."""
    from transformers import AutoModelForCausalLM

    cfg = engine.EngineConfig(zero_stage=stage)
    return engine.initialize(engine.load_model(AutoModelForCausalLM, path, cfg), cfg, 1)


def test_training_models_load_in_their_precision_and_partitioned_under_zero3(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    one_process(monkeypatch)

    path = str(tiny / "model")
    full = engine.load_model(AutoModelForCausalLM, path, engine.EngineConfig(precision="bf16"))
    assert {p.dtype for p in full.parameters()} == {torch.bfloat16}

    cfg = engine.EngineConfig(zero_stage=3, precision="bf16")
    partitioned = engine.load_model(AutoModelForCausalLM, path, cfg)
    params = list(partitioned.parameters())
    # zero.Init: every parameter is a partition (one rank: all of it lives in ds_tensor)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    assert sum(p.ds_numel for p in params) == sum(p.numel() for p in full.parameters())

    # Closed after loading: the next model (a frozen one under ZeRO-0) is whole.
    frozen = engine.load_frozen(
        AutoModelForSequenceClassification, path, engine.frozen_config(0, False, "bf16"), "bf16"
    )
    assert not any(hasattr(p, "ds_id") for p in frozen.parameters())


def test_weights_gathered_at_every_token_are_never_compiled_over(tiny, monkeypatch):
    """ZeRO-3 weights too large for the device are gathered layer by layer at every decode
    step, into new buffers each time: a compiled (CUDA-graph) decode step would replay the
    addresses it captured, so the static cache runs eager there, whatever compile_decode
    says; gathered once per rollout, the decode step is compiled as asked."""

    from jobs.generation import SamplingConfig, cache_options, gathered_per_token, sample
    from jobs.models import load_tokenizer

    one_process(monkeypatch)
    path = str(tiny / "model")
    actor = an_actor(path, 3)
    compiled = SamplingConfig(
        cache="static", compile_decode=True, do_sample=False, max_new_tokens=4
    )
    tokenizer = load_tokenizer(path)
    with engine.for_generation(actor, gather=False) as (model, _):
        assert gathered_per_token(model)
        assert cache_options(compiled, model) == {
            "cache_implementation": "static",
            "disable_compile": True,
        }
        # and generate takes it so: nothing compiled, the tokens those of the dynamic cache
        eos, prompts = {tokenizer.eos_token_id}, ["Hi", "Tell me"]
        static = sample(model, tokenizer, prompts, compiled, eos, seed=1)
        assert not hasattr(model, "_compiled_call")
        dynamic = compiled.model_copy(update={"cache": "dynamic", "compile_decode": None})
        assert static.sequences.equal(sample(model, tokenizer, prompts, dynamic, eos, 1).sequences)
    with engine.for_generation(actor, gather=True) as (model, _):
        assert not gathered_per_token(model)
        assert "compile_config" in cache_options(compiled, model)


def hook_names(module) -> list[str]:
    """The module's forward pre- and post-hooks, by function, in the order they run."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return [getattr(h, "__qualname__", type(h).__name__) for h in hooks]


@pytest.mark.parametrize(("stage", "compiled"), [(0, False), (2, False), (2, True), (3, False)])
def test_deepspeed_neither_waits_for_the_device_nor_hooks_forwards_for_nothing(
    tiny, monkeypatch, stage, compiled
):
    """DeepSpeed's throughput timer, on by default, synchronised the device at the start of
    every forward and at every step from the third on (the host waited for the GPU twice a
    micro-batch, for a figure no stage reads): no synchronisation now, counted at the
    accelerator over 5 training steps. And the engine's hooks around every forward, idle
    outside ZeRO-3 in the config the stages write, are gone there (the frozen models'
    engines' too, and a compiled model's); ZeRO-3 keeps them (its flag for parameters
    fetched unannounced)."""
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    one_process(monkeypatch)
    accelerator, waits = get_accelerator(), []
    synchronize = accelerator.synchronize

    def counted(*args, **kwargs):
        waits.append(traceback.extract_stack()[-2].name)
        return synchronize(*args, **kwargs)

    monkeypatch.setattr(accelerator, "synchronize", counted)
    path = str(tiny / "model")
    cfg = engine.EngineConfig(zero_stage=stage, compile=compiled)
    actor = engine.initialize(engine.load_model(AutoModelForCausalLM, path, cfg), cfg, 1)
    frozen = engine.initialize_frozen(
        AutoModelForCausalLM.from_pretrained(path),
        engine.frozen_config(3 if stage == 3 else 0, False, "fp32"),
    )
    batch = torch.tensor([[5, 6, 7, 8]])
    for _ in range(0 if compiled else 5):  # (compiled: only the hooks; what compiles is costly)
        actor.backward(actor(input_ids=batch, labels=batch).loss)
        actor.step()
        frozen(input_ids=batch)
    assert waits == []
    for model in (actor, frozen):
        hooks = [h for h in hook_names(model.module) if "DeepSpeedEngine._create_module" in h]
        assert len(hooks) == (2 if stage == 3 else 0), hooks


@pytest.mark.parametrize("lora", [False, True], ids=["engine", "engine+lora"])
def test_the_kept_positions_reach_the_model_through_the_engine_and_lora(tiny, monkeypatch, lora):
    """The training stages call their model through DeepSpeed's engine, and with LoRA
    through peft's wrapper: ``logits_to_keep`` reaches the causal LM inside both, whose
    head projects only the 2 positions that predict the answer of a 6-token row (a
    wrapper that dropped it is an error, not positions read wrong)."""
    from transformers import AutoModelForCausalLM

    from jobs.batches import IGNORE
    from jobs.supervised import collate, token_losses

    one_process(monkeypatch)
    cfg = engine.EngineConfig(lora=engine.LoraConfig(r=4) if lora else None)
    actor = engine.initialize(
        engine.load_model(AutoModelForCausalLM, str(tiny / "model"), cfg), cfg, 1
    )
    projected = []
    actor.module.get_output_embeddings().register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[1])
    )
    losses, mask = token_losses(actor, collate([([5, 6, 7, 8, 9, 10], [IGNORE] * 4 + [9, 10])], 0))
    assert projected == [2] and losses.shape == mask.shape == (1, 2) and bool(mask.all())
    actor.backward(losses.sum())
    actor.step()


@pytest.mark.parametrize(("stage", "gather"), [(3, True), (3, False)])
def test_a_rollout_runs_without_the_engines_own_forward_hooks(tiny, monkeypatch, stage, gather):
    """DeepSpeed's engine hooks its module's every forward (timers, the flops profiler,
    ZeRO-3's flag for parameters a forward fetches unannounced). Dynamo in torch 2.11
    cannot trace them, so the compiled decode step ran them eager at every token, in
    pieces around the compiled forward (the GPU machine's torch; here torch 2.13 traces
    them, and the rehearsal venv, ``make gpu-rehearsal``, showed the 5 eager frames);
    ZeRO-3's start-of-forward hook is never traced (two graph breaks, either torch).
    Over whole weights a rollout needs none of them: under ZeRO-3 gathered once they are
    off while the actor generates, and back after, in their order among ZeRO-3's hooks
    (outside ZeRO-3 the engine's are gone from the start: the test above); over weights
    gathered at every token (never compiled) ZeRO-3 needs them, and they stay. The compile
    itself is the ZeRO-3 case of ``test_a_rollout_over_gathered_weights_compiles_whole``."""

    one_process(monkeypatch)
    path = str(tiny / "model")
    actor = an_actor(path, stage)
    before = hook_names(actor.module)
    engines = [h for h in before if "DeepSpeedEngine._create_module_forward" in h]
    assert len(engines) == 2, before
    with engine.for_generation(actor, gather=gather) as (model, _):
        during = hook_names(model)
        model(input_ids=torch.tensor([[5, 6, 7]]))  # a forward runs without them
    assert [h for h in during if h in engines] == ([] if gather else engines), during
    if gather:  # each in its place, doing nothing (and ZeRO-3's start-of-forward hook)
        assert sum(h == "_no_hook" for h in during) == 3, during
    assert hook_names(actor.module) == before  # the same hooks, in the same order
    # and training goes on with them
    batch = torch.tensor([[5, 6, 7, 8]])
    actor.backward(actor(input_ids=batch, labels=batch).loss)
    actor.step()


@pytest.mark.parametrize("stage", [2, 3])
def test_a_rollout_over_gathered_weights_compiles_whole(tiny, monkeypatch, stage):
    """The actor's compiled decode step, as PPO and GRPO run it: no graph break and no
    frame run eager (under ZeRO-3 DeepSpeed's start-of-forward hook broke the graph twice;
    under torch 2.11 the engine's hooks ran as 5 eager frames, which ``make gpu-rehearsal``
    checks), and the same compiled step for every rollout, training steps between them."""
    from torch._dynamo.utils import counters

    from jobs.compiled import CompileWatch
    from jobs.generation import SamplingConfig, sample
    from jobs.models import load_tokenizer

    one_process(monkeypatch)
    path = str(tiny / "model")
    actor = an_actor(path, stage)
    tokenizer = load_tokenizer(path)
    compiled = SamplingConfig(
        cache="static", compile_decode=True, do_sample=False, max_new_tokens=4
    )
    torch._dynamo.reset()
    watch, graphs = CompileWatch(), counters["stats"]["unique_graphs"]
    batch = torch.tensor([[5, 6, 7, 8]])
    for _ in range(2):  # two rollouts
        with engine.for_generation(actor, gather=True) as (model, _):
            sample(model, tokenizer, ["Hi", "Tell me"], compiled, {tokenizer.eos_token_id}, 1)
        actor.backward(actor(input_ids=batch, labels=batch).loss)
        actor.step()
    assert watch.counts(on_cuda=False) == {"breaks": 0, "eager_frames": 0}
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_training_models_use_the_attention_kernel_asked_for(tiny):
    """``train.attn_implementation`` reaches the model (SFT, reward, DPO's policy and its
    reference, C-RLFT load through engine.model_options); a kernel whose package or GPU
    is missing is a config error naming the field, not a traceback from transformers."""
    from transformers import AutoModelForCausalLM

    path = str(tiny / "model")
    for kernel in ("eager", "sdpa"):
        cfg = engine.EngineConfig(attn_implementation=kernel)
        assert engine.load_model(AutoModelForCausalLM, path, cfg).config._attn_implementation == (
            kernel
        )
    # flash-attention computes in 16 bits: in fp32 transformers only warns, and the kernel
    # failed at the first forward, a bug's exit instead of a config error
    with pytest.raises(ValidationError, match="runs in bf16 only"):
        engine.EngineConfig(attn_implementation="flash_attention_2")
    flash = engine.EngineConfig(attn_implementation="flash_attention_2", precision="bf16")
    if not torch.cuda.is_available():  # flash-attn needs a CUDA GPU
        with pytest.raises(BadInputError, match="train.attn_implementation 'flash_attention_2'"):
            engine.model_options(flash)


def test_a_compiled_reward_model_scores_through_its_compiled_backbone(tiny):
    """A classifier scores as its backbone and head called apart (its own forward reads the
    last token only), and DeepSpeed's engine.compile compiles the module's forward, which
    scoring never calls: a reward stage with train.compile ran eager. Its backbone is
    compiled now: scoring runs through TorchDynamo, with the eager model's scores."""
    import torch._dynamo
    from transformers import AutoModelForSequenceClassification

    from jobs.scoring import last_token_scores

    def load():
        torch.manual_seed(0)  # the same new score head each time
        return AutoModelForSequenceClassification.from_pretrained(str(tiny / "model"), num_labels=1)

    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    mask = (ids != 0).long()
    with torch.no_grad():
        eager = last_token_scores(load().eval(), ids, mask)
    cfg = engine.EngineConfig(compile=True, micro_batch_size=2)
    ds = engine.initialize(load(), cfg, 1, task_type="SEQ_CLS")
    ds.eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled = last_token_scores(ds, ids, mask)
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # frames compiled, none before
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_generating_policies_refuse_a_compiled_training_forward():
    """A compiled forward recompiles for every rollout length: PPO's actor and critic and
    GRPO's policy refuse ``compile``."""
    from jobs import grpo

    common = {"output": "o", "actor": "m", "prompts": "d"}
    with pytest.raises(ValidationError, match="actor_train.compile"):
        ppo.Config(**common, reward_model="r", actor_train={"compile": True})
    with pytest.raises(ValidationError, match="critic_train.compile"):
        ppo.Config(**common, reward_model="r", critic_train={"compile": True})
    assert ppo.Config(**common, reward_model="r")
    rewards = [{"kind": "answer_match"}]
    with pytest.raises(ValidationError, match="train.compile"):
        grpo.Config(**common, rewards=rewards, train={"compile": True})
    assert grpo.Config(**common, rewards=rewards)


def test_the_entrypoint_configures_the_cuda_allocator(monkeypatch, tmp_path):
    from jobs.__main__ import main

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    (tmp_path / "c.yaml").write_text("output: o\n")
    assert main(["no-such-stage", "--config", str(tmp_path / "c.yaml")]) == 65
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # a pod's own wins
    main(["no-such-stage", "--config", str(tmp_path / "c.yaml")])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"


def test_the_entrypoint_runs_deterministic_kernels_when_asked(monkeypatch, tmp_path):
    from jobs.__main__ import main

    (tmp_path / "c.yaml").write_text("output: o\n")
    # set, then removed: monkeypatch then takes it out again after the test, whoever set it
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    main(["no-such-stage", "--config", str(tmp_path / "c.yaml")])
    assert not torch.are_deterministic_algorithms_enabled()  # not by default: it costs speed
    assert torch.backends.cuda.mem_efficient_sdp_enabled()
    monkeypatch.setenv("KUBERLHF_DETERMINISTIC", "1")
    kernels = ("flash", "mem_efficient", "cudnn")
    were = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in kernels}
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        main(["no-such-stage", "--config", str(tmp_path / "c.yaml")])
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not any(getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in kernels)
        assert torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:  # as they were, for the tests after this one in the same process
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        for k, was in were.items():
            getattr(torch.backends.cuda, f"enable_{k}_sdp")(was)


def tiny_models(tiny, dropout: float) -> SimpleNamespace:
    """PPO's four models as plain modules, each with dropout, in the shape rollout reads."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from jobs.generation import eos_ids_of
    from jobs.models import load_tokenizer

    path = str(tiny / "model")
    options = {"attention_dropout": dropout, "hidden_dropout": dropout}
    tokenizer = load_tokenizer(path)
    actor = AutoModelForCausalLM.from_pretrained(path, **options).train()
    critic = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **options)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    for model in (critic, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    return SimpleNamespace(
        actor=SimpleNamespace(
            module=actor, device=torch.device("cpu"), zero_optimization_stage=lambda: 0
        ),
        critic=SimpleNamespace(module=critic.train()),
        reference=engine.Reference(None, SimpleNamespace(module=reference)),
        reward=SimpleNamespace(module=reward),
        tokenizer=tokenizer,
        eos=eos_ids_of(actor, tokenizer),
    )


def rollout_config(prompts: int, **sampling) -> ppo.Config:
    """A PPO config whose one minibatch is the whole rollout of ``prompts`` answers."""
    return ppo.Config(
        output="o",
        actor="a",
        reward_model="r",
        prompts="p",
        rollout_batch_size=prompts,
        minibatch_size=prompts,
        sampling={"max_new_tokens": 8, **sampling},
    )


def test_rollouts_are_scored_without_dropout_in_micro_batches(tiny):
    models = tiny_models(tiny, dropout=0.5)
    prompts = [f"### User:\nhello {i}\n\n### Assistant:\n" for i in range(6)]
    config = rollout_config(len(prompts))
    whole = ppo.rollout(models, prompts, config, seed=3)
    in_pairs = ppo.rollout(
        models, prompts, config.model_copy(update={"scoring_batch_size": 2}), seed=3
    )
    assert models.actor.module.training and models.critic.module.training  # restored
    torch.testing.assert_close(whole["sequences"], in_pairs["sequences"])
    for key in ("old_logp", "values", "ref_logp", "scores"):  # no dropout: the same numbers
        torch.testing.assert_close(whole[key], in_pairs[key], atol=1e-5, rtol=1e-4)

    # and they are the policy's without dropout
    actor = models.actor.module.eval()
    expected, _ = rollout.token_logprobs(
        actor, whole["sequences"], whole["attention"], whole["start"]
    )
    torch.testing.assert_close(whole["old_logp"], expected * whole["mask"], atol=1e-5, rtol=1e-4)


def test_rollouts_are_scored_under_the_temperature_they_were_sampled_at(tiny):
    """Answers drawn at temperature 0.5 come from softmax(logits / 0.5): the old and the
    reference log-probs (the ratio's denominator, the KL penalty) are that policy's, as
    TRL's and OpenRLHF's PPO take them (they were the temperature-1 policy's)."""
    models = tiny_models(tiny, dropout=0.0)
    prompts = [f"### User:\nhello {i}\n\n### Assistant:\n" for i in range(4)]
    config = rollout_config(len(prompts), temperature=0.5)
    batch = ppo.rollout(models, prompts, config, seed=3)
    seqs, attention, start, mask = (batch[k] for k in ("sequences", "attention", "start", "mask"))
    for key, model in (("old_logp", models.actor), ("ref_logp", models.reference.frozen)):
        with torch.no_grad():
            logits = model.module.eval()(input_ids=seqs, attention_mask=attention).logits
        drawn_from = torch.log_softmax(logits[:, start - 1 : -1].float() / 0.5, -1)
        expected = drawn_from.gather(-1, seqs[:, start:, None]).squeeze(-1) * mask
        torch.testing.assert_close(batch[key], expected, atol=1e-5, rtol=1e-4)
        at_one = torch.log_softmax(logits[:, start - 1 : -1].float(), -1)
        assert (
            at_one.gather(-1, seqs[:, start:, None]).squeeze(-1) * mask - expected
        ).abs().max() > 0.01


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_process_outside_zero_does_not_all_reduce_its_gradients_with_itself(
    tiny, monkeypatch, precision
):
    """Outside ZeRO, DeepSpeed's engine flattened every step's gradients into buckets,
    all-reduced them over a group of one process and copied them back: two passes over
    every gradient for an identity. One process now trains without that reduction, to the
    same weights bit for bit as with it (which a forced engine still runs: the control);
    ZeRO-2's own reduction, which fills its optimiser's partitions, stays."""
    from transformers import AutoModelForCausalLM

    one_process(monkeypatch)
    path = str(tiny / "model")
    reductions: dict[str, int] = {}
    weights = {}
    for name, stage, forced in (("ours", 0, False), ("reduced", 0, True), ("zero2", 2, False)):
        torch.manual_seed(0)
        cfg = engine.EngineConfig(zero_stage=stage, precision=precision, learning_rate=1e-2)
        actor = engine.initialize(engine.load_model(AutoModelForCausalLM, path, cfg), cfg, 3)
        if forced:
            actor.enable_backward_allreduce = True
        reductions[name] = 0
        reduce = actor.allreduce_gradients

        def counted(*args, reduce=reduce, name=name, **kwargs):
            reductions[name] += 1
            return reduce(*args, **kwargs)

        monkeypatch.setattr(actor, "allreduce_gradients", counted)
        for step in range(3):
            batch = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]]) + step
            actor.backward(actor(input_ids=batch, labels=batch).loss)
            actor.step()
        weights[name] = {k: v.detach().clone() for k, v in actor.module.state_dict().items()}
    assert reductions == {"ours": 0, "reduced": 3, "zero2": 3}
    before = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert any(not torch.equal(weights["ours"][k].float(), before[k]) for k in before)
    for key, value in weights["reduced"].items():
        assert torch.equal(weights["ours"][key], value), key


def test_a_lora_models_reference_is_itself_with_its_adapters_off(tiny):
    """TRL's trainers take a peft model's reference from the model itself, adapters
    disabled: its starting point exactly, no second copy of the weights. After a change
    to the adapters, the reference's log-probs are still the base model's; outside the
    reference the adapters are on again (the control: the trained model's differ)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(tiny / "model")).eval()
    cfg = engine.EngineConfig(lora={"r": 4})
    trained = engine.prepare_model(AutoModelForCausalLM.from_pretrained(str(tiny / "model")), cfg)
    with torch.no_grad():
        for name, weight in trained.named_parameters():
            if "lora_B" in name:  # as a few steps of training would leave them
                weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    trained.eval()
    sequences = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(sequences)
    reference = engine.Reference(SimpleNamespace(module=trained))
    with torch.no_grad():
        base, _ = rollout.token_logprobs(lm, sequences, attention, 4)
        with reference.model() as model:
            off, _ = rollout.token_logprobs(model, sequences, attention, 4)
        on, _ = rollout.token_logprobs(trained, sequences, attention, 4)
    torch.testing.assert_close(off, base)
    assert (on - base).abs().max() > 0.01
    assert engine.adapters_as_reference(cfg, None, "test")
    assert not engine.adapters_as_reference(cfg, "another/model", "test")
    assert not engine.adapters_as_reference(engine.EngineConfig(), None, "test")
