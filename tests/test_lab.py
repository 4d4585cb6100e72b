"""The architecture lab: SSA and CAT attention, the recall/copying tasks, CoT2 and test-time training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# importing the lab tasks registers them with get_task
import thinkling.tasks.copying
import thinkling.tasks.recall  # noqa: F401
from thinkling.errors import ThinklingError
from thinkling.lab import EXPERIMENTS, cot2, ttt
from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyConfig, TinyPolicy, TinyTransformer
from thinkling.tasks import get_task
from thinkling.train.common import make_optimizer
from thinkling.train.sft import weighted_ce

BASE = {"vocab_size": 99, "d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64}
VARIANTS = [
    ("ssa", {}),
    ("ssa", {"query": False}),
    ("ssa", {"value": False, "position": False}),
    ("cat", {}),
    ("cat", {"kernel_size": 1}),
    ("cat", {"kernel_size": 3, "query": False, "rope": False}),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model(attention="standard", seed=0, **options) -> TinyTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyTransformer(TinyConfig(**BASE, attention=attention, attention_options=options))


def scrambled(attention, options) -> TinyTransformer:
    """Large random weights (temperatures and filters included) so outputs differ from token to token."""
    m = model(attention, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in m.named_parameters():
            if "norm" in name:
                continue
            w.copy_(torch.randn(w.shape, generator=g) * (1.0 if "temp" in name or "filters" in name else 0.3))
    return m


def tokens(n=20, seed=0) -> torch.Tensor:
    return torch.randint(3, 99, (2, n), generator=torch.Generator().manual_seed(seed))


# --- SSA and CAT -------------------------------------------------------------------------


def test_ssa_with_unit_temperatures_equals_standard_attention():
    standard, ids = model(), tokens()
    ssa = model("ssa")
    ssa.load_state_dict(standard.state_dict(), strict=False)
    with torch.no_grad():
        for blk in ssa.blocks:  # τ_tok = tanh(0) = 0 already; σ(α) -> 0 makes τ_pos = 1
            blk.attn.position_temp.fill_(-1e4)
    torch.testing.assert_close(ssa(ids), standard(ids))
    off = model("ssa", query=False, value=False, position=False)
    off.load_state_dict(standard.state_dict())
    assert torch.equal(off(ids), standard(ids))


def test_ssa_temperatures_change_the_output_and_have_their_own_learning_rate():
    ssa, ids = scrambled("ssa", {}), tokens()
    before = ssa(ids)
    with torch.no_grad():
        ssa.blocks[0].attn.query_temp.zero_()
    assert not torch.allclose(before, ssa(ids))
    temps = [p for n, p in ssa.named_parameters() if "temp" in n]
    assert len(temps) == 3 * BASE["n_layers"] and all(p.lr_scale == 10.0 for p in temps)
    groups = {g["lr_scale"]: len(g["params"]) for g in make_optimizer(ssa, 1e-3, 0.0).param_groups}
    assert groups[10.0] == len(temps)
    extra = sum(p.numel() for p in temps)
    assert extra == BASE["n_layers"] * (2 * BASE["d_model"] + BASE["n_heads"])
    assert extra / model().num_parameters() < 0.005


def test_cat_with_identity_filters_equals_standard_attention():
    standard, ids = model(), tokens()
    cat = model("cat", kernel_size=3)
    cat.load_state_dict(standard.state_dict(), strict=False)
    with torch.no_grad():
        for name, w in cat.named_parameters():
            if "filters" in name:
                w.zero_()
                w[:, -1] = 1.0
    torch.testing.assert_close(cat(ids), standard(ids))


@pytest.mark.parametrize("attention, options", VARIANTS)
def test_a_future_token_never_changes_an_earlier_output(attention, options):
    m, ids = scrambled(attention, options), tokens()
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 7) % 96 + 3
    a, b = m(ids), m(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("attention, options", VARIANTS)
def test_kv_cache_generation_equals_cache_free(attention, options):
    policy = TinyPolicy.create({k: v for k, v in BASE.items() if k != "vocab_size"} | {"attention": attention,
                               "attention_options": options}, seed=0)
    policy.model.load_state_dict(scrambled(attention, options).state_dict())
    prompts = [policy.encode_prompt(t) for t in ("12+3=", "a", "hello world", "xyz", "The quick brown fox")]
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    fast = policy.generate(prompts, greedy)
    assert fast == policy.generate_reference(prompts, greedy)
    assert len({tuple(o) for o in fast}) > 3
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
    assert policy.generate(prompts, sampled) == policy.generate(prompts, sampled, share_prompts=False)


@pytest.mark.parametrize(
    "attention, options, key",
    [
        ("ssa", {"query": "yes"}, "query"),
        ("ssa", {"lr_scale": 0}, "lr_scale"),
        ("ssa", {"kernel_size": 3}, "kernel_size"),
        ("cat", {"kernel_size": 0}, "kernel_size"),
        ("cat", {"rope": 1}, "rope"),
        ("cat", {"position": True}, "position"),
    ],
)
def test_bad_attention_options_name_the_key(attention, options, key):
    with pytest.raises(ThinklingError, match=key):
        model(attention, **options)


# --- recall and copying ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["recall", "copying"])
def test_lab_tasks_are_deterministic_and_their_targets_verify(name):
    task = get_task(name)
    problems = task.problems(30, seed=3, difficulty=[2, 8, 32])
    assert [(p.prompt, p.answer) for p in problems] == [(p.prompt, p.answer) for p in task.problems(30, 3, [2, 8, 32])]
    assert [p.prompt for p in problems] != [p.prompt for p in task.problems(30, 4, [2, 8, 32])]
    for p in problems:
        assert task.verify(p, task.target(p)).correct and task.target(p) == f"A:{p.answer}"
        assert not task.verify(p, "A:" + p.answer[::-1] + "x").correct
    with pytest.raises(ThinklingError, match="difficulty"):
        task.problems(2, seed=0, difficulty=60)


def test_recall_answer_is_the_value_of_the_query_key():
    for p in get_task("recall").problems(50, seed=0, difficulty=[1, 5, 20]):
        pairs, query = p.prompt.split(" ")
        table = dict(zip(pairs[::2], pairs[1::2]))
        assert len(table) == p.difficulty and table[query] == p.answer


def test_copying_answer_is_the_letters_without_noise():
    task = get_task("copying", max_gap=3)
    for p in task.problems(50, seed=0, difficulty=[1, 6, 20]):
        assert p.prompt.replace(".", "") == p.answer and len(set(p.answer)) == p.difficulty
    with pytest.raises(ThinklingError, match="max_gap"):
        get_task("copying", max_gap=-1)


# --- CoT2 --------------------------------------------------------------------------------

LAYOUT = cot2.MNNSLayout()
PROBLEMS = [(1, 7, 3, 5), (9, 9, 1, 2), (4, 4, 4, 4), (2, 8, 6, 1)]


def test_mnns_data_targets_traces_and_answers():
    data = cot2.make_data(LAYOUT, PROBLEMS)
    optimal = cot2.make_data(LAYOUT, PROBLEMS, traces="optimal")
    torch.testing.assert_close(data.targets.sum(-1), torch.ones(len(PROBLEMS), 3))
    assert data.answer.tolist() == [LAYOUT.value(v) for v in (0, 1, 0, 1)]
    assert ((optimal.targets > 0) <= (data.targets > 0)).all()  # optimal traces are among all traces
    assert optimal.targets.gather(-1, data.trace[..., None]).gt(0).all()  # the SFT trace is an optimal one
    assert (data.targets[:, 0] > 0).sum(-1).tolist() == [2, 2, 2, 2]  # ±d1
    with pytest.raises(ThinklingError, match="traces"):
        cot2.make_data(LAYOUT, PROBLEMS, traces="some")


def test_csft_with_one_hot_targets_is_discrete_sft():
    m, data = cot2.new_model(LAYOUT, 16), cot2.make_data(LAYOUT, PROBLEMS)
    one_hot = F.one_hot(data.trace, LAYOUT.vocab_size).float()
    torch.testing.assert_close(cot2.mixture(m, one_hot), m.embed(data.trace))
    ids = torch.cat((data.prompts, data.trace, data.answer[:, None]), 1)
    weights = torch.cat((torch.zeros_like(data.prompts), torch.ones(len(PROBLEMS), 4, dtype=torch.long)), 1)
    sft = weighted_ce(m(ids), ids, weights.float())
    torch.testing.assert_close(cot2.csft_loss(m, data.prompts, one_hot, data.answer), sft)


def test_multi_token_sampling_with_one_token_is_discrete_sampling():
    m, prompts = cot2.new_model(LAYOUT, 16, seed=1), cot2.make_data(LAYOUT, PROBLEMS * 4).prompts
    with torch.no_grad():
        m.embed.weight.mul_(20)  # peaked enough that samples differ between rows, flat enough to vary
    mts = cot2.sample_multi_token(m, prompts, K=1, generator=torch.Generator().manual_seed(5))
    discrete = cot2.sample_discrete(m, prompts, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mts.tokens, discrete.tokens) and torch.equal(mts.answer, discrete.answer)
    torch.testing.assert_close(mts.logp, discrete.logp)
    assert len({tuple(t) for t in mts.tokens[..., 0].tolist()}) > 2


def test_rollout_logprobs_reproduce_the_sampler_and_grpo_trains():
    m, data = cot2.new_model(LAYOUT, 16, seed=2), cot2.make_data(LAYOUT, PROBLEMS)
    roll = cot2.sample_multi_token(m, data.prompts, K=3, generator=torch.Generator().manual_seed(0))
    assert roll.tokens.shape == (4, 3, 3) and roll.logp.shape == (4, 4)
    torch.testing.assert_close(cot2.rollout_logprobs(m, data.prompts, roll), roll.logp)
    with torch.no_grad():
        m.embed.weight.mul_(20)
    data.answer = cot2.soft_decode(m, data.prompts)  # an answer the policy sometimes samples: rewards vary
    before = [p.clone() for p in m.parameters()]
    rewards = cot2.train_grpo(m, data, K=2, steps=2, prompts_per_step=4, group_size=8, lr=1e-2)
    assert len(rewards) == 2 and 0 < sum(rewards) < 2
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


# --- test-time training ------------------------------------------------------------------


def test_regression_prompts_are_seeded_and_the_shift_knob_picks_a_subspace():
    shifted = ttt.RegressionPrompts(dim=6, task_rank=2)
    x, y = shifted.sample(5, 20, torch.Generator().manual_seed(0))
    x2, y2 = shifted.sample(5, 20, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (5, 21, 6)
    w = torch.linalg.lstsq(x, y[..., None]).solution.squeeze(-1)  # noiseless: the exact task weights
    basis = shifted.rotation()[:, :2]
    assert (w - w @ basis @ basis.T).abs().max() < 1e-4 and w.abs().min() > 0
    x, _ = ttt.RegressionPrompts(dim=6, x_condition=100.0).sample(2000, 10, torch.Generator().manual_seed(0))
    eig = torch.linalg.eigvalsh(x.flatten(0, 1).T.cov())
    assert 50 < eig.max() / eig.min() < 200 and abs(eig.mean() - 1) < 0.05
    for bad in ({"task_rank": 7}, {"x_condition": 0.5}):
        with pytest.raises(ThinklingError, match=next(iter(bad))):
            ttt.RegressionPrompts(dim=6, **bad)


def test_a_test_time_training_step_lowers_the_loss_on_the_demonstrations():
    prompts = ttt.RegressionPrompts(dim=4, noise=0.1)
    m = ttt.LinearAttentionICL(4, seed=0)
    ttt.pretrain(m, prompts, steps=150, n_range=(4, 16), lr=1e-2)
    x, y = prompts.sample(64, 12, torch.Generator().manual_seed(9))
    before = ttt.fold_loss(m.w_kq, m.w_pv, x[:, :-1], y[:, :-1], folds=3)
    weights = ttt.test_time_train(m, x, y, steps=1, lr=1e-3, folds=3)
    after = ttt.fold_loss(*weights, x[:, :-1], y[:, :-1], folds=3)
    assert after.mean() < before.mean() and (after < before).float().mean() > 0.9
    assert weights[0].shape == (64, *m.w_kq.shape)
    assert m.predict(x, y, weights).shape == (64,)


def test_every_lab_experiment_runs_from_the_installed_package(capsys):
    """`thinkling lab run NAME` needs no source checkout: each experiment is a module with main(argv)."""
    import importlib

    from thinkling.cli import main

    for name, (description, module) in EXPERIMENTS.items():
        assert description and callable(importlib.import_module(f"thinkling.lab.experiments.{module}").main), name
    assert main(["lab", "run", "nope"]) == 2 and "unknown lab experiment 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_lab_run_quick_writes_its_table_and_plot(tmp_path):
    from thinkling.cli import main

    assert main(["lab", "run", "ttt-regression", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "table.md").exists() and (tmp_path / "ttt.png").exists()
