"""The memory-saving paths compute the same losses and gradients as the plain ones.

`masked_token_logprobs` scores tokens from an HF policy's hidden states a chunk of
rows at a time (never a `[B, T, V]` logits tensor); these tests hold it to the
computation it replaced: full logits -> token_logprobs / entropy_from_logits /
weighted_ce, on a tiny random Llama (no downloads), with LoRA and without, in
float32 (to float rounding) and under bf16 autocast.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from test_hf_policy import make_model, make_tokenizer  # noqa: E402  (tests/ is on sys.path)

from thinkling.algorithms import entropy_from_logits, policy_loss, rl_knobs  # noqa: E402
from thinkling.models import logprobs as lp  # noqa: E402
from thinkling.models.hf import HFPolicy, _apply_lora, _lora_config  # noqa: E402
from thinkling.train.rl import Batch, minibatch_loss  # noqa: E402
from thinkling.train.sft import sft_loss, weighted_ce  # noqa: E402


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """A few rows per chunk, so every test crosses chunk boundaries."""
    monkeypatch.setattr(lp, "HEAD_CHUNK_BYTES", 3 * 4 * 64)


def test_head_logprobs_equals_full_logits_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(50, (37,), generator=g)
    cot = torch.randn(37, generator=g, dtype=torch.float64), torch.randn(37, generator=g, dtype=torch.float64)

    logp, ent = lp.head_logprobs(hidden, weight, bias, targets, entropy=True, chunk_bytes=4 * 50 * 5)
    grads = torch.autograd.grad((logp * cot[0]).sum() + (ent * cot[1]).sum(), (hidden, weight, bias))
    logits = F.linear(hidden, weight, bias)
    ref_logp, ref_ent = lp.token_logprobs(logits, targets).double(), entropy_from_logits(logits.double())
    ref = torch.autograd.grad((ref_logp * cot[0]).sum() + (ref_ent * cot[1]).sum(), (hidden, weight, bias))
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-6, atol=1e-6)  # values are float32
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # both sides compute in float32


def test_head_logprobs_without_entropy_or_bias_and_frozen_weight():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 4, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, generator=g)  # a frozen head (LoRA): no weight gradient is computed
    targets = torch.randint(7, (10,), generator=g)
    logp, ent = lp.head_logprobs(hidden, weight, None, targets, chunk_bytes=4 * 7 * 3)
    assert ent is None
    logp.sum().backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    lp.token_logprobs(ref_hidden @ weight.T, targets).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


def _policy(lora: bool) -> HFPolicy:
    model = make_model(seed=3)
    if lora:
        model = _apply_lora(model, _lora_config({"r": 4, "dropout": 0.0}, model))
        for name, p in model.named_parameters():  # peft starts lora_B at zero: move it so LoRA matters
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return HFPolicy(model, make_tokenizer())


def _batch(policy):
    """Right-padded rows with prompts of different lengths; loss on each row's completion."""
    g = torch.Generator().manual_seed(5)
    lengths, prompts = [14, 9, 17, 12], [5, 7, 4, 6]
    T, V = max(lengths), policy.model.config.vocab_size
    ids = torch.full((4, T), policy.pad_id)
    attn = torch.zeros(4, T, dtype=torch.long)
    loss_mask = torch.zeros(4, T)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        ids[i, :n] = torch.randint(5, V, (n,), generator=g)
        attn[i, :n] = 1
        loss_mask[i, p:n] = 1
    return Batch(ids, attn, loss_mask[:, 1:], torch.tensor([1.0, -0.5, 0.25, -0.75]))


def _old_minibatch_loss(policy, batch, knobs, old_logp, ref_logp):
    """The RL loss as it was computed before: full logits from the first trained position."""
    start = lp.first_loss_position(batch.loss_mask)
    logits = policy.logits(batch.ids, batch.attention_mask, keep_from=start)
    logp = F.pad(lp.token_logprobs(logits[:, :-1], batch.ids[:, start + 1 :]), (start, 0))
    entropy = F.pad(entropy_from_logits(logits[:, :-1]), (start, 0))
    return policy_loss(logp, old_logp, batch.advantages, batch.loss_mask, eps_low=knobs.eps_low,
                       eps_high=knobs.eps_high, aggregation=knobs.aggregation, ref_logp=ref_logp,
                       beta=knobs.beta, kl_estimator=knobs.kl_estimator, entropy=entropy,
                       entropy_coef=knobs.entropy_coef, max_len=16)


def _grads(policy, loss):
    params = [p for p in policy.model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_rl_loss_and_gradients_equal_the_full_logits_computation(lora, autocast):
    policy = _policy(lora)
    policy.model.train()
    batch = _batch(policy)
    g = torch.Generator().manual_seed(7)
    noise = lambda: 0.3 * torch.randn(batch.loss_mask.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        base = lp.sequence_logprobs(policy, batch.ids, batch.attention_mask)
    old_logp, ref_logp = base + noise(), base + noise()  # ratios away from 1: clipping and KL both act
    tol = {"rtol": 2e-2, "atol": 2e-3} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for algorithm in ("grpo", "dapo", "dr_grpo"):
        knobs = rl_knobs(algorithm, {"beta": 0.04, "entropy_coef": 0.01})
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            new, new_stats, logp = minibatch_loss(policy, batch, slice(None), knobs, max_len=16,
                                                  old_logp=old_logp, ref_logp=ref_logp)
            old, old_stats = _old_minibatch_loss(policy, batch, knobs, old_logp, ref_logp)
        torch.testing.assert_close(new, old, **tol)
        for key in old_stats:
            assert new_stats[key] == pytest.approx(old_stats[key], rel=tol["rtol"], abs=tol["atol"]), key
        for got, want in zip(_grads(policy, new), _grads(policy, old)):
            torch.testing.assert_close(got, want, **tol)
        assert torch.all(logp[batch.loss_mask == 0] == 0)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_loss_and_sequence_logprobs_equal_the_full_logits_computation(lora):
    policy = _policy(lora)
    policy.model.train()
    batch = _batch(policy)
    weights = F.pad(batch.loss_mask, (1, 0)) * torch.linspace(0.5, 1.5, batch.ids.shape[1])  # token weights
    new = sft_loss(policy, batch.ids, batch.attention_mask, weights)
    old = weighted_ce(policy.logits(batch.ids, batch.attention_mask), batch.ids, weights)
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(policy, new), _grads(policy, old)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    half = torch.tensor(7.5)  # a data-parallel shard divides by the whole batch's weight
    torch.testing.assert_close(sft_loss(policy, batch.ids, batch.attention_mask, weights, denominator=half),
                               weighted_ce(policy.logits(batch.ids, batch.attention_mask), batch.ids, weights,
                                           denominator=half))

    with torch.no_grad():
        for keep_from in (0, 4):
            got = lp.sequence_logprobs(policy, batch.ids, batch.attention_mask, keep_from=keep_from)
            logits = policy.logits(batch.ids, batch.attention_mask)[:, :-1]
            want = lp.token_logprobs(logits, batch.ids[:, 1:]).masked_fill(batch.attention_mask[:, 1:] == 0, 0)
            want[:, :keep_from] = 0
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_only_llama_family_heads_skip_the_logits():
    policy = _policy(False)
    assert policy.output_head() is not None
    policy.model.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits are not the plain head
    assert policy.output_head() is None


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_keeps_loss_and_gradients(lora):
    policy = _policy(lora)
    policy.model.train()
    batch = _batch(policy)
    knobs = rl_knobs("grpo", {"entropy_coef": 0.01})
    plain, _, _ = minibatch_loss(policy, batch, slice(None), knobs, max_len=16)
    want = _grads(policy, plain)
    assert not policy.gradient_checkpointing
    policy.gradient_checkpointing = True
    assert policy.gradient_checkpointing
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ckpt, _, _ = minibatch_loss(policy, batch, slice(None), knobs, max_len=16)
    torch.testing.assert_close(ckpt, plain)
    for got, ref in zip(_grads(policy, ckpt), want):
        torch.testing.assert_close(got, ref)
    policy.gradient_checkpointing = False
    assert not policy.gradient_checkpointing
    saved_plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_plain.append(t.numel()) or t, lambda t: t):
        minibatch_loss(policy, batch, slice(None), knobs, max_len=16)
    assert sum(saved) < sum(saved_plain) / 2  # the layers' activations are recomputed, not kept


def test_gradient_checkpointing_recipe_key(tmp_path):
    from thinkling.config import ModelConfig
    from thinkling.errors import ThinklingError
    from thinkling.models import build_policy

    path = tmp_path / "tiny-llama"
    HFPolicy(make_model(), make_tokenizer()).save(str(path))
    policy = build_policy(ModelConfig(backend="hf", name=str(path), gradient_checkpointing=True), seed=0)
    assert policy.gradient_checkpointing
    assert not build_policy(ModelConfig(backend="hf", name=str(path)), seed=0).gradient_checkpointing
    with pytest.raises(ThinklingError, match="gradient_checkpointing"):
        build_policy(ModelConfig(backend="tiny", tiny={"d_model": 16, "n_layers": 1, "n_heads": 2},
                                 gradient_checkpointing=True), seed=0)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_the_minibatch_gradient(aggregation):
    from thinkling.config import RLConfig
    from thinkling.train.common import make_optimizer
    from thinkling.train.rl import RLTrainer, resolve_knobs

    policy = _policy(lora=True)
    policy.model.train()
    batch = _batch(policy)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        old_logp = lp.sequence_logprobs(policy, batch.ids, batch.attention_mask)
    old_logp = old_logp + 0.3 * torch.randn(old_logp.shape, generator=g)
    results = []
    for size in (None, 1, 3):
        rl = RLConfig(aggregation=aggregation, entropy_coef=0.01, beta=0.04, max_new_tokens=16, micro_batch_size=size)
        trainer = RLTrainer(policy, None, [], rl, resolve_knobs(rl), make_optimizer(policy.model, 1e-3, 0.0), seed=0,
                            reference=copy.deepcopy(policy))  # its presence only: ref_logp is given
        policy.model.zero_grad(set_to_none=True)
        loss, stats = trainer._accumulate(batch, torch.arange(4), old_logp, old_logp - 0.1, nullcontext())
        grads = [p.grad.clone() for p in policy.model.parameters() if p.requires_grad]
        results.append((loss, stats, grads))
    (loss, stats, grads) = results[0]
    for other_loss, other_stats, other_grads in results[1:]:
        torch.testing.assert_close(other_loss, loss)
        for key in stats:
            assert other_stats[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-7), key
        for got, want in zip(other_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)



def test_sft_micro_batches_take_the_same_step():
    from thinkling.config import SFTConfig
    from thinkling.train.common import make_optimizer
    from thinkling.train.sft import Example, train_sft

    g = torch.Generator().manual_seed(11)
    examples = []
    for n, p in ((9, 3), (14, 6), (6, 2), (11, 4), (12, 7)):
        ids = torch.randint(5, 40, (n,), generator=g).tolist()
        examples.append(Example(ids, [0.0] * p + [1.0] * (n - p)))
    states = []
    for size in (None, 1, 3):
        policy = _policy(lora=False)
        cfg = SFTConfig(steps=2, batch_size=6, lr=1e-2, warmup_steps=0, micro_batch_size=size)
        last = train_sft(policy, examples, cfg, seed=0, optimizer=make_optimizer(policy.model, cfg.lr, 0.0))
        states.append((policy.model.state_dict(), last))
    for state, _ in states[1:]:
        for name, value in states[0][0].items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)  # Adam magnifies rounding of ~0 grads
