"""Prefix sharing in the RL update (`rl.share_prompt`): each group's prompt runs once, and the
log-probs, entropies and gradients equal the unshared computation's to float rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from thinkling.config import RLConfig
from thinkling.models.base import pad_batch
from thinkling.models.logprobs import masked_token_logprobs, shared_prefix_logprobs
from thinkling.models.tiny import TinyPolicy
from thinkling.rollout.groups import Group
from thinkling.rollout.scoring import Completion
from thinkling.train.rl import RLTrainer, resolve_knobs

TOL = 1e-5


def _rows(vocab: tuple[int, int], seed: int = 0):
    """Three groups with different prompt lengths (3, 2, 2 completions of different lengths), right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows, prefix = [], []
    for P, G in ((7, 3), (12, 2), (4, 2)):
        prompt = torch.randint(*vocab, (P,), generator=g).tolist()
        for _ in range(G):
            rows.append(prompt + torch.randint(*vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist())
            prefix.append(P)
    return rows, torch.tensor(prefix)


def _compare(policy, rows, prefix, *, expect_shared: bool = True):
    """Max |difference| of log-probs and entropies, and of parameter gradients relative to the
    largest gradient, shared vs unshared."""
    ids, attn = pad_batch(rows, policy.pad_id)
    mask = torch.zeros(len(rows), ids.shape[1] - 1)
    for b, (r, p) in enumerate(zip(rows, prefix.tolist())):
        mask[b, p - 1 : len(r) - 1] = 1
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    calls = []
    for name in ("prefix_shared_logits", "prefix_shared_hidden"):
        if hasattr(policy, name):
            fn = getattr(policy, name)
            setattr(policy, name, lambda *a, fn=fn: calls.append(a) or fn(*a))
    out = []
    for share in (False, True):
        if share:
            logp, ent = shared_prefix_logprobs(policy, ids, attn, mask, prefix, entropy=True, temperature=0.7)
        else:
            logp, ent = masked_token_logprobs(policy, ids, attn, mask, entropy=True, temperature=0.7)
        grads = torch.autograd.grad((logp * weights).sum() + 0.1 * ent.sum(), params)
        out.append((logp.detach(), ent.detach(), torch.cat([g.flatten() for g in grads])))
    assert bool(calls) == expect_shared
    if calls:  # one row per distinct prompt, each prompt minus its last token
        prefix_ids = calls[0][0]
        assert prefix_ids.shape == (3, 11)
    (a, ea, ga), (b, eb, gb) = out
    assert torch.all(b[mask == 0] == 0) and torch.all(eb[mask == 0] == 0)
    assert ga.abs().max() > 0.1  # the gradients compared are not trivially zero
    diffs = (float((a - b).abs().max()), float((ea - eb).abs().max()), float((ga - gb).abs().max() / ga.abs().max()))
    print("max |diff| logp, entropy, grad (relative):", diffs)
    return diffs


@pytest.mark.parametrize("attention", ["standard", "ssa", "cat"])
def test_tiny_shared_prefix_equals_unshared(attention):
    policy = TinyPolicy.create({"d_model": 32, "n_layers": 2, "n_heads": 2, "attention": attention}, seed=0)
    policy.model.train()
    diffs = _compare(policy, *_rows((5, 30)))
    assert max(diffs) < TOL, diffs


def _hf_policy(tmp_path, **load):
    transformers = pytest.importorskip("transformers")
    from test_hf_policy import make_model, make_tokenizer

    from thinkling.models.hf import HFPolicy

    HFPolicy(make_model(), make_tokenizer()).save(str(tmp_path))
    policy = HFPolicy.load(str(tmp_path), device="cpu", **load)
    policy.model.train()
    assert transformers  # loaded
    return policy


@pytest.mark.parametrize("lora", [None, {"r": 4, "dropout": 0.0}])
def test_hf_shared_prefix_equals_unshared(tmp_path, lora):
    policy = _hf_policy(tmp_path, lora=lora)
    if lora:  # LoRA's B starts at zero: move it so the adapters change the outputs
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    diffs = _compare(policy, *_rows((5, 60)))
    assert max(diffs) < TOL, diffs


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_hf_shared_prefix_equals_unshared_on_other_layouts(arch):
    """q/k/v biases (Qwen2), per-head q/k norms (Qwen3)."""
    pytest.importorskip("transformers")
    from test_engine import _policy, make_model

    policy = _policy(make_model(arch, initializer_range=0.02))
    policy.model.train()
    diffs = _compare(policy, *_rows((5, 60)))
    assert max(diffs) < TOL, diffs


@pytest.mark.parametrize("lora", [None, {"r": 4, "dropout": 0.0}])
def test_hf_shared_prefix_under_gradient_checkpointing_equals_unshared(tmp_path, lora):
    """Checkpointed layers replay their forward in backward: the caches must look the same then."""
    policy = _hf_policy(tmp_path, lora=lora)
    policy.gradient_checkpointing = True
    assert policy.gradient_checkpointing and policy.prefix_sharing()
    diffs = _compare(policy, *_rows((5, 60)))
    assert max(diffs) < TOL, diffs
    layers = policy.model.get_base_model().model.layers if lora else policy.model.model.layers
    assert all("_can_checkpoint_with_cache" not in layer.__dict__ for layer in layers)  # left as it was


def _groups(policy):
    """Two plain groups and a BREAD-anchored one (its prefix: prompt + anchor), G = 3."""
    rows, _ = _rows((5, 30), seed=3)
    g = torch.Generator().manual_seed(4)
    groups = []
    for i, (P, anchor) in enumerate(((9, 0), (6, 0), (8, 5))):
        prefix = torch.randint(5, 30, (P + anchor,), generator=g).tolist()
        comps = [Completion("", torch.randint(5, 30, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
                            + [policy.eos_id], False, None, False) for _ in range(3)]
        groups.append(Group(None, prefix, comps, anchor_steps=int(anchor > 0), anchor_tokens=anchor,
                            rewards=[1.0, 0.0, float(i % 2)], position=i))
    return groups


@pytest.mark.parametrize("over", [{}, {"micro_batch_size": 3, "entropy_coef": 0.01},
                                  {"ppo_epochs": 2, "minibatches": 2, "beta": 0.1}])
def test_rl_update_with_shared_prompts_equals_unshared(over):
    """The whole update (π_old, reference, micro-batches, BREAD prefixes) takes the same steps:
    the gradients each optimizer step sees are equal, and so are the update's stats."""
    from thinkling.train.common import make_optimizer

    base = TinyPolicy.create({"d_model": 32, "n_layers": 2, "n_heads": 2}, seed=0)
    grads, stats, calls = [], [], []
    for share in (False, True):
        policy = copy.deepcopy(base)
        cfg = RLConfig(group_size=3, lr=1e-2, share_prompt=share, **over)
        knobs = resolve_knobs(cfg)
        optimizer = make_optimizer(policy.model, cfg.lr, 0.0)
        seen = []
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, seen=seen, model=policy.model: seen.append(
                torch.cat([p.grad.flatten() for p in model.parameters()])))
        reference = copy.deepcopy(base) if knobs.beta > 0 else None
        shared = policy.prefix_shared_logits
        policy.prefix_shared_logits = lambda *a, shared=shared: calls.append(len(a[0])) or shared(*a)
        trainer = RLTrainer(policy, None, [], cfg, knobs, optimizer, seed=0, reference=reference)
        stats.append(trainer.update(_groups(policy), 0, 1))
        grads.append(seen)
    assert calls and all(n <= 3 for n in calls)  # only the shared run shares: one prefix per group at most
    assert len(grads[0]) == len(grads[1]) == cfg.ppo_epochs * cfg.minibatches
    for a, b in zip(*grads):
        assert a.abs().max() > 1e-3 and (a - b).abs().max() < TOL * a.abs().max()
    for key, value in stats[0].items():
        assert stats[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_share_prompt_is_a_checked_recipe_key(tmp_path):
    from thinkling.config import load_recipe
    from thinkling.errors import ThinklingError

    assert load_recipe(None, ["rl.share_prompt=true"]).rl.share_prompt is True
    with pytest.raises(ThinklingError, match="share_prompt"):
        load_recipe(None, ["rl.share_prompt=3"])
