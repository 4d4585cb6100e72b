import json
import math

import pytest
import torch
from test_learning import Repeat

from thinkling.config import load_recipe
from thinkling.errors import ThinklingError
from thinkling.models.logprobs import first_loss_position
from thinkling.rollout.bread import anchor_failed_groups
from thinkling.rollout.groups import Group, branch_prefix, sample_groups
from thinkling.rollout.prompts import anchor_text, prompt_text
from thinkling.tasks import get_task
from thinkling.tasks.base import Problem
from thinkling.train.rl import build_batch, minibatch_loss, resolve_knobs

TINY = "model.tiny={d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 160}"


class AnchorNeedingPolicy:
    """Wraps a tiny policy; answers correctly iff the prefix holds >= `need` expert steps."""

    def __init__(self, base, problems, need):
        self.base, self.need = base, need
        self.answers = {prompt_text(p): p.answer for p in problems}
        self.calls = 0
        for name in ("encode_prompt", "encode_text", "decode", "eos_id", "pad_id", "model"):
            setattr(self, name, getattr(base, name))

    def sample(self, prompts, params):
        from thinkling.models.base import Sample

        self.calls += 1
        out = []
        for ids in prompts:
            text = self.base.decode(ids)
            prompt, _, anchor = text.partition("\n")
            steps = anchor.count("\n")
            answer = self.answers[prompt + "\n"] if steps >= self.need else "x"
            out.append(Sample(self.base.encode_text(f"A:{answer}") + [self.base.eos_id]))
        return out


def test_bread_finds_the_shortest_successful_anchor(tiny_policy):
    task = get_task("chain")
    problems = task.problems(3, 0, 8)
    policy = AnchorNeedingPolicy(tiny_policy, problems, need=5)
    failed = sample_groups(policy, task, [(p, None, 0) for p in problems], 2, None)
    assert not any(g.has_success for g in failed)
    memory = {}
    kept, stats = anchor_failed_groups(policy, task, failed, 2, lambda r: None, None, memory)
    assert [g.anchor_steps for g in kept] == [5, 5, 5]
    assert all(g.has_success for g in kept)
    assert stats["bread/probe_groups"] <= 3 * 4  # ceil(log2 8) + 1 probes per problem at most
    assert stats["bread/probe_rounds"] == policy.calls - 1  # probes of all groups share one batch per round
    assert memory == {p.id: 5 for p in problems}
    # the anchor is exactly the first k expert steps after the prompt, as context
    g = kept[0]
    assert policy.decode(g.prefix).endswith(anchor_text(g.problem, 5))
    assert g.anchor_tokens == len(policy.encode_text(anchor_text(g.problem, 5)))


class RestOfTracePolicy:
    """Wraps a tiny policy; after any anchor it writes the rest of the expert trace (right), with
    none a wrong answer: every anchor length k >= 1 solves the problem."""

    def __init__(self, base, task, problems):
        self.base, self.targets = base, {prompt_text(p): task.target(p) for p in problems}
        for name in ("encode_prompt", "encode_text", "decode", "eos_id", "pad_id", "model"):
            setattr(self, name, getattr(base, name))

    def sample(self, prompts, params):
        from thinkling.models.base import Sample

        out = []
        for ids in prompts:
            prompt, _, anchor = self.base.decode(ids).partition("\n")
            target = self.targets[prompt + "\n"]
            rest = target[len(anchor):] if anchor and target.startswith(anchor) else "The answer is 0."
            out.append(Sample(self.base.encode_text(rest) + [self.base.eos_id]))
        return out


def test_midline_anchors_stop_after_the_equals_and_bread_trains_the_first_result(tiny_policy):
    """With `arithmetic`'s `midline` steps the anchor of k steps is exactly the trace's first
    characters, ending mid-line at odd k, and BREAD's shortest anchor is the question's own ` =`:
    the branched continuation starts with the first partial sum."""
    task = get_task("arithmetic", trace="rewrite", midline=True)
    problems = task.problems(3, 0, 3)
    p, target = problems[0], task.target(problems[0])
    x, y, z = (int(t) for t in p.prompt[8:-1].split(" + "))
    first, second = f"{x} + {y} + {z} = {x + y} + {z}\n", f"{x + y} + {z} = {x + y + z}\n"
    assert [anchor_text(p, k) for k in range(5)] == [
        "", f"{x} + {y} + {z} =", first, first + f"{x + y} + {z} =", first + second]
    assert all(target.startswith(anchor_text(p, k)) for k in range(5))
    policy = RestOfTracePolicy(tiny_policy, task, problems)
    failed = sample_groups(policy, task, [(q, None, 0) for q in problems], 2, None)
    assert not any(g.has_success for g in failed)
    kept, stats = anchor_failed_groups(policy, task, failed, 2, lambda r: None, None, {})
    assert [g.anchor_steps for g in kept] == [1, 1, 1] and stats["bread/probe_groups"] == 3 * 2  # k = 2, then 1
    for g in kept:
        assert policy.decode(g.prefix).endswith(f"{g.problem.prompt[8:-1]} =")
        assert g.anchor_tokens == len(policy.encode_text(anchor_text(g.problem, 1)))
        assert all(c.correct and c.text == task.target(g.problem) for c in g.completions)
        assert policy.decode(g.completions[0].ids).startswith(f" {sum(map(int, g.problem.prompt[8:-1].split(' + ')[:2]))} + ")


def test_bread_drops_problems_without_traces_or_unsolved(tiny_policy):
    task = get_task("chain")
    problems = task.problems(2, 0, 4)
    policy = AnchorNeedingPolicy(tiny_policy, problems, need=99)  # never solvable
    failed = sample_groups(policy, task, [(p, None, 0) for p in problems], 2, None)
    kept, stats = anchor_failed_groups(policy, task, failed, 2, lambda r: None, 2, None)
    assert kept == [] and stats["bread/dropped_unsolved"] == 2 and stats["bread/probe_groups"] == 4


def _knobs(**over):
    from thinkling.config import RLConfig

    return resolve_knobs(RLConfig(**over))


def test_prompt_and_anchor_tokens_get_exactly_zero_gradient(tiny_policy):
    """Regression: hint/anchor tokens must never enter the loss (a known bug elsewhere trained on them)."""
    task = get_task("chain")
    p = task.problems(1, 0, 4)[0]
    prefix, n_anchor = branch_prefix(tiny_policy, p, None, 2)
    completion = tiny_policy.encode_text("A:" + p.answer) + [tiny_policy.eos_id]
    from thinkling.rollout.scoring import score

    comps = [score(tiny_policy, task, p, completion), score(tiny_policy, task, p, completion[:3])]
    group = Group(p, prefix, comps, anchor_steps=2, anchor_tokens=n_anchor, rewards=[1.0, 0.0])
    batch = build_batch([group], torch.tensor([[1.0, -1.0]]), tiny_policy.pad_id)
    for algorithm in ("grpo", "dapo", "dr_grpo", "clgrpo"):
        knobs = _knobs(algorithm=algorithm, entropy_coef=0.01)
        seen = []
        logits_fn = tiny_policy.logits

        def keep(*a, **kw):
            seen.append(logits_fn(*a, **kw))
            seen[-1].retain_grad()
            return seen[-1]

        tiny_policy.logits = keep
        try:
            loss, stats, logp = minibatch_loss(tiny_policy, batch, slice(None), knobs, max_len=16)
        finally:
            del tiny_policy.logits
        loss.backward()
        start = first_loss_position(batch.loss_mask)
        assert seen[0].shape[1] == batch.ids.shape[1] - start  # logits before the first trained position are not even computed
        g = torch.nn.functional.pad(seen[0].grad, (0, 0, start, 0))  # back to absolute positions
        assert torch.all(logp[batch.loss_mask == 0] == 0)
        # logits at position t score token t+1: positions before len(prefix)-1 score prompt/anchor tokens
        assert torch.all(g[:, : len(prefix) - 1] == 0), algorithm
        assert torch.any(g[0, len(prefix) - 1 : len(prefix) + len(completion) - 1] != 0), algorithm
        # padding after the short completion gets nothing either
        assert torch.all(g[1, len(prefix) + 2 :] == 0), algorithm
        assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0
        tiny_policy.model.zero_grad()


def test_mu1_gradient_is_reinforce_with_baseline(tiny_policy):
    """With μ = 1 the clipped loss has the REINFORCE gradient: -Σ A·∇log π / tokens."""
    task = get_task("chain")
    p = task.problems(1, 0, 2)[0]
    prefix = branch_prefix(tiny_policy, p, None, 0)[0]
    from thinkling.rollout.scoring import score

    ids_a = tiny_policy.encode_text("A:1") + [tiny_policy.eos_id]
    ids_b = tiny_policy.encode_text("A:22") + [tiny_policy.eos_id]
    group = Group(p, prefix, [score(tiny_policy, task, p, ids_a), score(tiny_policy, task, p, ids_b)])
    adv = torch.tensor([[0.7, -0.7]])
    batch = build_batch([group], adv, tiny_policy.pad_id)
    knobs = _knobs(algorithm="dapo")  # token-mean
    loss, _, _ = minibatch_loss(tiny_policy, batch, slice(None), knobs, max_len=16)
    grads = torch.autograd.grad(loss, list(tiny_policy.model.parameters()))
    from thinkling.models.logprobs import sequence_logprobs

    logp = sequence_logprobs(tiny_policy, batch.ids, batch.attention_mask)
    m = batch.loss_mask
    reinforce = -(logp * m * batch.advantages[:, None]).sum() / m.sum()
    ref = torch.autograd.grad(reinforce, list(tiny_policy.model.parameters()))
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-6)


def _rl_overrides(tmp, name, extra=()):
    return [f"output_dir={tmp}/{name}", TINY, "model.init=null", "train.size=32", "train.difficulty=[2]", "eval.size=4",
            "eval.difficulty=2", "rl.steps=4", "rl.prompts_per_step=2", "rl.group_size=3", "rl.max_new_tokens=12",
            "rl.save_every=2", "rl.lr=1e-3", "eval.max_new_tokens=12", *extra]


@pytest.mark.parametrize("extra", [["rl.bread.enabled=true", "rl.ppo_epochs=2", "rl.minibatches=2"],
                                   ["rl.beta=0.5"]])  # the KL anchor is the run's start, also after a resume
def test_rl_resume_equals_uninterrupted_run(tmp_path, extra):
    import shutil

    from thinkling import jobs
    from thinkling.models import load_policy

    jobs.run_rl(load_recipe("recipes/quickstart/grpo.yaml", _rl_overrides(tmp_path, "a", extra)))
    jobs.run_rl(load_recipe("recipes/quickstart/grpo.yaml", _rl_overrides(tmp_path, "b", extra)))
    b = tmp_path / "b"
    shutil.rmtree(b / "checkpoints" / "step_000004")
    shutil.rmtree(b / "final")
    (b / "checkpoints" / "latest").write_text("step_000002")
    jobs.run_rl(load_recipe("recipes/quickstart/grpo.yaml", _rl_overrides(tmp_path, "b", extra)), resume=True)
    wa, wb = load_policy(tmp_path / "a").model.state_dict(), load_policy(b).model.state_dict()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    key = lambda rows: [(r["step"], r.get("reward_mean"), r.get("bread/probe_groups"), r.get("kl_mean"))  # noqa: E731
                        for r in rows]
    assert key(rows_a) == key(rows_b)
    assert all(0.01 < r["mem/peak_rss_gb"] < 64 for r in rows_a if "reward_mean" in r)  # peak memory in every step


def test_dynamic_sampling_drops_groups_with_equal_rewards(tmp_path, tiny_policy):
    from thinkling.config import RLConfig
    from thinkling.train.rl import RLTrainer

    task = get_task("chain")
    cfg = RLConfig(algorithm="dapo", prompts_per_step=3, group_size=2, max_new_tokens=4)
    trainer = RLTrainer(tiny_policy, task, task.problems(8, 0, 6), cfg, resolve_knobs(cfg), None, seed=0)
    groups, stats = trainer.collect(0)  # an untrained model fails everything: every group has equal rewards
    assert groups == [] and stats["groups_dropped_equal"] == stats["groups_sampled"] == 3


@pytest.mark.parametrize("override, message", [
    ("rl.eps_low=-0.1", "rl.eps_low"),
    ("rl.group_size=1", "rl.group_size"),
    ("rl.advantage=ppo", "rl.advantage"),
    ("rl.algorithm=ppo", "rl.algorithm"),
    ("rl.rewards={accuracy: 1, speed: 2}", "rl.rewards"),
])
def test_bad_rl_values_fail_at_start(tmp_path, override, message):
    from thinkling import jobs

    with pytest.raises(ThinklingError, match=message.replace(".", r"\.")):
        jobs.run_rl(load_recipe("recipes/quickstart/grpo.yaml", [*_rl_overrides(tmp_path, "x"), override]))
    assert not (tmp_path / "x").exists(), "nothing is written when the recipe is bad"


def test_bread_needs_expert_traces(tmp_path):
    from thinkling import jobs

    over = [*_rl_overrides(tmp_path, "x"), "rl.bread.enabled=true", "train.name=gym",
            "train.options={dataset: basic_arithmetic}", "train.difficulty=null"]
    with pytest.raises(ThinklingError, match="expert traces"):
        jobs.run_rl(load_recipe("recipes/quickstart/grpo.yaml", over))


def test_bread_counts_every_probe_token(tiny_policy):
    """BREAD's cost includes failed probes, not only the branch it keeps."""
    task = get_task("chain")
    problems = task.problems(2, 0, 8)
    policy = AnchorNeedingPolicy(tiny_policy, problems, need=5)
    failed = sample_groups(policy, task, [(p, None, 0) for p in problems], 2, None)
    kept, stats = anchor_failed_groups(policy, task, failed, 2, lambda r: None, None, None)
    kept_tokens = sum(c.tokens for g in kept for c in g.completions)
    assert stats["generated_tokens"] > kept_tokens


def test_tldr_run_logs_per_level_length_and_accuracy(tmp_path):
    """A TLDR run logs, per length level, the mean length and accuracy of that level's completions."""
    from thinkling import jobs

    rewards = "rl.rewards={accuracy: 1.0, format: 0.0, length: {lam: 0.5, budgets: {short: 4, long: 12}}}"
    over = [*_rl_overrides(tmp_path, "t"), "rl.steps=1", "rl.save_every=1", "rl.prompts_per_step=6", rewards]
    jobs.run_rl(load_recipe("recipes/quickstart/grpo.yaml", over))
    rows = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward_mean" in r)
    for level in ("short", "long"):
        assert 0 <= step[f"tldr/{level}/accuracy"] <= 1
        assert 0 < step[f"tldr/{level}/completion_len_mean"] <= 12
    assert not any(k.startswith("tldr/medium/") for k in step)  # not a configured level


def test_level_metrics_average_over_each_levels_completions():
    from thinkling.rollout.scoring import Completion
    from thinkling.train.rl import level_metrics

    def grp(level, *comps):
        return Group(Problem("p", "1", "1"), [], [Completion("", [0] * n, ok, None, True) for n, ok in comps], level)

    groups = [grp("short", (2, True), (4, False)), grp("long", (10, True), (20, True)), grp("short", (6, False), (8, True))]
    out = level_metrics(groups, ("short", "medium", "long"))
    assert out == {"tldr/short/completion_len_mean": 5.0, "tldr/short/accuracy": 0.5,
                   "tldr/long/completion_len_mean": 15.0, "tldr/long/accuracy": 1.0}


def test_asymmetric_clip_warns_when_it_cannot_act(tmp_path, capsys):
    from thinkling.train.rl import validate_rl

    def warned(*over):
        cfg = load_recipe("recipes/quickstart/grpo.yaml", [*_rl_overrides(tmp_path, "w"), *over])
        validate_rl(cfg, get_task("chain").problems(4, 0, 2))
        return "clip never acts" in " ".join(capsys.readouterr().err.split())  # rich wraps long lines

    assert warned("rl.algorithm=clgrpo") and warned("rl.algorithm=dapo")
    assert warned("rl.algorithm=grpo", "rl.eps_high=0.1")  # asymmetric by override
    assert not warned("rl.algorithm=clgrpo", "rl.ppo_epochs=2")
    assert not warned("rl.algorithm=clgrpo", "rl.minibatches=2")
    assert not warned("rl.algorithm=grpo")  # symmetric: plain GRPO at μ = 1 is the intended setting


def test_bf16_update_and_skipped_prompt_logits_keep_the_loss(tiny_policy):
    """`rl.bf16` autocasts the update's forward: the loss and gradient stay close to fp32; and
    sequence_logprobs from the first trained position equals the full computation there."""
    from thinkling.models.logprobs import sequence_logprobs
    from thinkling.rollout.scoring import score

    task = get_task("chain")
    p = task.problems(1, 0, 3)[0]
    prefix = branch_prefix(tiny_policy, p, None, 0)[0]
    comps = [score(tiny_policy, task, p, tiny_policy.encode_text(t) + [tiny_policy.eos_id]) for t in ("A:1", "A:22")]
    batch = build_batch([Group(p, prefix, comps)], torch.tensor([[0.7, -0.7]]), tiny_policy.pad_id)
    start = first_loss_position(batch.loss_mask)
    full = sequence_logprobs(tiny_policy, batch.ids, batch.attention_mask)
    kept = sequence_logprobs(tiny_policy, batch.ids, batch.attention_mask, keep_from=start)
    assert torch.allclose(full[:, start:], kept[:, start:], atol=1e-6) and not kept[:, :start].any()
    knobs = _knobs(algorithm="grpo")
    fp32, _, _ = minibatch_loss(tiny_policy, batch, slice(None), knobs, max_len=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _, _ = minibatch_loss(tiny_policy, batch, slice(None), knobs, max_len=16)
    g32 = torch.autograd.grad(fp32, list(tiny_policy.model.parameters()))
    g16 = torch.autograd.grad(bf16, list(tiny_policy.model.parameters()))
    flat32, flat16 = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.98


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_trainer_logprobs_are_those_of_the_sampling_temperature(tiny_policy, temperature):
    """Rollouts sampled at T come from softmax(logits / T): the trainer's log-probs of the sampled
    tokens must be that distribution's, not the T = 1 one (checked against sampled frequencies)."""
    import copy

    from thinkling.models.base import SamplingParams
    from thinkling.models.logprobs import sequence_logprobs

    tiny_policy = copy.deepcopy(tiny_policy)
    with torch.no_grad():  # a peaked next-token distribution, so the temperature matters
        tiny_policy.model.lm_head.weight.mul_(5)
    prompt = tiny_policy.encode_prompt("12 +3 -4\n")
    n = 6000
    firsts = [ids[0] for ids in tiny_policy.generate([prompt] * n, SamplingParams(1, temperature, 1.0, None, seed=3))]
    freq = torch.bincount(torch.tensor(firsts), minlength=tiny_policy.model.config.vocab_size).float() / n
    top = torch.topk(freq, 3).indices
    ids = torch.tensor([prompt + [int(t)] for t in top])
    mask = torch.ones_like(ids)
    at_t = sequence_logprobs(tiny_policy, ids, mask, temperature=temperature)[:, -1].exp()
    at_1 = sequence_logprobs(tiny_policy, ids, mask)[:, -1].exp()
    tolerance = 4 * (freq[top] * (1 - freq[top]) / n).sqrt() + 1e-3
    assert ((at_t - freq[top]).abs() <= tolerance).all(), (at_t, freq[top])
    assert ((at_1 - freq[top]).abs() > tolerance).any()  # the unscaled log-probs are measurably wrong
    # the trainer's update uses the same scaled log-probs
    knobs = _knobs()
    batch = build_batch([Group(None, prompt, [_comp([int(t)]) for t in top])], torch.zeros(1, 3), tiny_policy.pad_id)
    _, _, logp = minibatch_loss(tiny_policy, batch, slice(None), knobs, max_len=1, temperature=temperature)
    assert torch.allclose(logp[:, -1].exp(), at_t, atol=1e-5)


def _comp(ids):
    from thinkling.rollout.scoring import Completion

    return Completion("", ids, False, None, False)


def test_rl_logs_the_dynamics_of_every_update(tmp_path):
    """KL to the starting policy, update size, entropy estimate, advantage shares, signal groups."""
    from thinkling import jobs

    jobs.run_rl(load_recipe("recipes/quickstart/grpo.yaml", _rl_overrides(tmp_path, "d", ["rl.steps=3", "rl.entropy_coef=0.01"])))
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "loss" in r]
    assert updates, "no step updated the policy"
    for r in updates:
        for key in ("kl_mean", "update_norm_rel", "weight_norm", "entropy_estimate", "tokens/adv_pos_frac",
                    "tokens/adv_neg_frac", "groups_with_signal", "offpolicy/kl", "offpolicy/ratio_max"):
            assert key in r, key
        assert 0 < r["update_norm_rel"] < 1 and r["entropy_estimate"] > 0
        assert abs(r["tokens/adv_pos_frac"] + r["tokens/adv_neg_frac"] - 1) < 1e-6 or r["groups_with_signal"] < 1
        assert abs(r["offpolicy/kl"]) < 1e-4  # fp32 sampler and trainer agree
    assert updates[0]["kl_mean"] < 1e-6 if updates[0]["step"] == 1 else True  # step 1 samples from the start
    assert updates[-1]["kl_mean"] > 0


def test_sampler_logprobs_equal_the_trainers(tiny_policy):
    """The log-probs the sampler records are those the trainer computes for the same tokens
    (temperature applied; with top-p, of the renormalised nucleus, so never below)."""
    from thinkling.models.base import SamplingParams
    from thinkling.models.logprobs import sequence_logprobs

    prompts = [tiny_policy.encode_prompt(t) for t in ("12 +3 -4\n", "7 -1\n")]
    for temperature, top_p in ((0.7, 1.0), (1.0, 0.9)):
        samples = tiny_policy.sample(prompts * 3, SamplingParams(12, temperature, top_p, None, seed=5))
        for prompt, s in zip(prompts * 3, samples):
            ids = torch.tensor([prompt + s.ids])
            trainer = sequence_logprobs(tiny_policy, ids, torch.ones_like(ids), temperature=temperature)[0, len(prompt) - 1:]
            if top_p == 1.0:
                assert torch.allclose(torch.tensor(s.logprobs), trainer, atol=1e-5)
            else:
                assert (torch.tensor(s.logprobs) >= trainer - 1e-5).all()


def test_truncated_importance_weights_by_hand():
    from thinkling.train.rl import sampler_correction

    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.9]]))  # ratios 2, 0.5, 1
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights, stats = sampler_correction(old, sampler, mask, cap=1.5)
    assert torch.allclose(weights[0, :2], torch.tensor([1.5, 0.5]))
    assert stats["offpolicy/truncated_frac"] == 0.5 and abs(stats["offpolicy/ratio_max"] - 2.0) < 1e-6
    assert abs(stats["offpolicy/kl"] - (-(math.log(2) + math.log(0.5)) / 2)) < 1e-6
    assert sampler_correction(old, sampler, mask, cap=None)[0] is None


def test_adam_step_norm_is_the_size_of_the_step(tiny_policy):
    """The update size logged by RL is recomputed from AdamW's moments, not from a copy of the weights."""
    from thinkling.train.common import adam_step_norm, make_optimizer

    model = tiny_policy.model
    optimizer = make_optimizer(model, 1e-3, 0.0)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        model(torch.tensor([[1, 5, 9, 12]])).pow(2).mean().backward()
        optimizer.step()
        delta = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before)) ** 0.5
        assert abs(adam_step_norm(optimizer) - delta) < 1e-4 * delta


def test_norms_by_pieces_equal_the_whole_tensor_norms(tiny_policy, monkeypatch):
    """The logged step and weight norms go through parameters in pieces (no parameter-sized
    temporaries); pieces of 7 elements give the norms of whole tensors."""
    import thinkling.train.common as common

    model = tiny_policy.model
    optimizer = common.make_optimizer(model, 1e-3, 0.0)
    model(torch.tensor([[1, 5, 9, 12]])).pow(2).mean().backward()
    optimizer.step()
    whole = common.adam_step_norm(optimizer), common.weight_norm(model)
    monkeypatch.setattr(common, "PIECE", 7)
    assert [tuple(len(t) for t in x) for x in common.pieces(torch.zeros(3, 5), torch.ones(3, 5))] == [(7, 7), (7, 7), (1, 1)]
    assert common.adam_step_norm(optimizer) == pytest.approx(whole[0], rel=1e-6)
    assert common.weight_norm(model) == pytest.approx(whole[1], rel=1e-6)
    assert whole[1] == pytest.approx(float(torch.cat([p.detach().flatten() for p in model.parameters()]).norm()), rel=1e-6)


def test_tldr_rollouts_show_the_level_to_the_policy_and_reward_its_budget(tiny_policy):
    """TLDR levels can only separate if the policy sees its level: every RL prompt carries the
    group's `[level]` tag (what is sampled AND what the update conditions on), and the reward
    applies that level's budget."""
    from thinkling.config import RLConfig
    from thinkling.rewards.length import tldr_length_factor
    from thinkling.train.common import make_optimizer
    from thinkling.train.rl import RLTrainer

    task = get_task("chain")
    problems = task.problems(20, 0, 2)
    answers = {p.prompt: p.answer for p in problems}

    class RightAnswerPolicy:  # right answers of several lengths, so the length factor shows
        def __init__(self, base):
            for name in ("encode_prompt", "encode_text", "decode", "eos_id", "pad_id", "model"):
                setattr(self, name, getattr(base, name))

        def sample(self, prompts, params):
            from thinkling.models.base import Sample

            prompts_text = [self.decode(ids).split("] ", 1)[-1].strip() for ids in prompts]
            return [Sample(self.encode_text("x\n" * (i % 5) + "A:" + answers[t]) + [self.eos_id])
                    for i, t in enumerate(prompts_text)]

    budgets = {"short": 3, "medium": 6, "long": 40}
    cfg = RLConfig(prompts_per_step=12, group_size=2, max_new_tokens=8,
                   rewards={"accuracy": 1.0, "format": 0.0, "length": {"lam": 0.5, "budgets": budgets}})
    trainer = RLTrainer(RightAnswerPolicy(tiny_policy), task, problems, cfg, resolve_knobs(cfg),
                        make_optimizer(tiny_policy.model, 1e-3, 0.0), seed=0)
    groups, _ = trainer.collect(0)
    assert {g.level for g in groups} == set(budgets)
    assert all(c.correct for g in groups for c in g.completions)
    assert len({r for g in groups for r in g.rewards}) > 2  # the budgets made a difference
    for g in groups:
        assert tiny_policy.decode(g.prefix) == prompt_text(g.problem, g.level) == f"[{g.level}] {g.problem.prompt}\n"
        expected = [float(c.correct) * tldr_length_factor(c.tokens, budgets[g.level], 0.5) for c in g.completions]
        assert g.rewards == pytest.approx(expected)
    batch = build_batch(groups, torch.zeros(len(groups), 2), tiny_policy.pad_id)
    for row, g in zip(batch.ids[::2], groups):  # the update scores completions after the tagged prompt
        assert row[: len(g.prefix)].tolist() == g.prefix


class _Letters(Repeat):
    """`test_learning.Repeat`, whose completion is lost once its letters stop spelling the answer,
    which `cannot_succeed` says after each line."""

    def cannot_succeed(self, problem, partial):
        letters = partial.replace("\n", "")[: len(problem.answer)]
        return letters != problem.answer[: len(letters)]


def test_bread_probe_early_stop_changes_nothing_but_the_cost():
    """Stopping probe groups none of whose samples can succeed any more keeps every search's outcome
    (the same anchors, the same kept groups to the last token and log-prob) and samples fewer tokens."""
    from thinkling.models.base import SamplingParams
    from thinkling.models.tiny import TinyConfig, TinyPolicy, TinyTransformer
    from thinkling.models.tokenizer import CharTokenizer

    tok = CharTokenizer("\nabcd")  # a small alphabet: a short suffix is guessable, a long one is not
    config = TinyConfig.from_dict({"vocab_size": tok.vocab_size, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                   "max_seq_len": 64})
    torch.manual_seed(0)
    policy, task = TinyPolicy(TinyTransformer(config), tok), _Letters()
    no_eos = lambda logits, history: logits.index_fill(1, torch.tensor([tok.eos_id]), -math.inf)  # all run 32 tokens
    params = lambda r: SamplingParams(32, logits_processor=no_eos, seed=100 + r)
    failed = [g for g in sample_groups(policy, task, [(p, None, 0) for p in task.problems(None, 0)], 8, params(-1))
              if not g.has_success]
    assert len(failed) == 4

    def search(early_stop: bool):
        memory = {}
        kept, stats = anchor_failed_groups(policy, task, failed, 8, params, None, memory, early_stop=early_stop)
        return [(g.problem.id, g.anchor_steps, g.prefix, [(c.ids, c.logprobs, c.text, c.correct) for c in g.completions])
                for g in kept], memory, stats

    kept, memory, stats = search(early_stop=False)
    kept_es, memory_es, stats_es = search(early_stop=True)
    assert len(kept) >= 2 and stats["bread/probe_groups"] > len(kept)  # failed probes were there to stop
    assert kept_es == kept and memory_es == memory
    assert {k: v for k, v in stats_es.items() if k != "generated_tokens"} == \
        {k: v for k, v in stats.items() if k != "generated_tokens"}
    assert stats_es["generated_tokens"] < 0.85 * stats["generated_tokens"], (stats_es, stats)  # (0.79)


def test_rl_bread_early_stop_key_trains_the_same_steps():
    """`rl.bread.early_stop` reaches the probes of a real RL step: the same metrics and weights, fewer tokens."""
    from thinkling.config import BreadConfig, RLConfig
    from thinkling.models.tiny import TinyConfig, TinyPolicy, TinyTransformer
    from thinkling.models.tokenizer import CharTokenizer
    from thinkling.train.common import make_optimizer
    from thinkling.train.rl import RLTrainer

    def run(early_stop: bool):
        tok = CharTokenizer("\nabcd")
        torch.manual_seed(0)
        policy = TinyPolicy(TinyTransformer(TinyConfig.from_dict({"vocab_size": tok.vocab_size, "d_model": 32,
                                                                   "n_layers": 1, "n_heads": 2, "max_seq_len": 64})), tok)
        task = _Letters()
        rl = RLConfig(prompts_per_step=4, group_size=8, lr=1e-3, max_new_tokens=32, kl_to_start=False,
                      bread=BreadConfig(enabled=True, early_stop=early_stop))
        trainer = RLTrainer(policy, task, task.problems(None, 0), rl, resolve_knobs(rl), make_optimizer(policy.model, rl.lr,
                                                                                                   rl.weight_decay), seed=0)
        logged = [trainer.step(step, 3)[0] for step in range(3)]
        return logged, torch.cat([p.detach().flatten() for p in policy.model.parameters()])

    (plain, w_plain), (stopped, w_stopped) = run(False), run(True)
    differ = lambda key: key.startswith(("time/", "mem/")) or key.endswith(("generated_tokens", "probe_tokens", "tokens_per_s"))
    for a, b in zip(plain, stopped):
        assert {k: v for k, v in a.items() if not differ(k)} == pytest.approx({k: v for k, v in b.items() if not differ(k)},
                                                                                rel=1e-5, abs=1e-7)
    assert sum(m["bread/probe_groups"] for m in plain) > 0
    assert sum(m["bread/probe_tokens"] for m in stopped) < sum(m["bread/probe_tokens"] for m in plain)
    assert torch.allclose(w_plain, w_stopped, rtol=0, atol=1e-6)
