"""Rollout DPO: the loss against numbers worked out by hand, pairs made only of a right and a wrong
completion, a frozen reference, learning on a small task, exact resume and one-line bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from thinkling.algorithms import dpo_loss
from thinkling.cli import main
from thinkling.config import DPOConfig
from thinkling.errors import ThinklingError
from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyConfig, TinyPolicy, TinyTransformer
from thinkling.models.tokenizer import CharTokenizer
from thinkling.rollout.groups import Group
from thinkling.rollout.pairs import preference_pairs
from thinkling.rollout.prompts import prompt_ids
from thinkling.rollout.scoring import Completion
from thinkling.runs import RunDir
from thinkling.tasks.base import Problem, Task, Verdict
from thinkling.train.dpo import DPOTrainer, train_dpo


# --------------------------------------------------------------------------------- the loss
def _pairs():
    """Two pairs. Pair 1: chosen gained 0.5 nats over the reference, rejected lost 0.5, margin h = 1.
    Pair 2: chosen lost 1, rejected gained 1, h = -2."""
    return (torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
            torch.tensor([-1.5, -2.0]))


def test_sigmoid_dpo_loss_matches_a_hand_computation():
    loss, stats = dpo_loss(*_pairs(), beta=0.5)
    # -log σ(0.5·1) = log(1 + e^-0.5) = 0.474077; -log σ(0.5·(-2)) = log(1 + e^1) = 1.313262
    assert loss.item() == pytest.approx((0.474077 + 1.313262) / 2, abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx((0.25 - 0.5) / 2)  # β·(log π − log π_ref) = 0.25, −0.5
    assert stats["rewards/rejected"] == pytest.approx((-0.25 + 0.5) / 2)
    assert stats["rewards/margins"] == pytest.approx((0.5 - 1.0) / 2)
    assert stats["rewards/accuracies"] == 0.5  # pair 1 ranked right, pair 2 wrong


def test_label_smoothing_and_ipo_match_a_hand_computation():
    chosen, rejected, ref_c, ref_r = _pairs()
    smoothed, _ = dpo_loss(chosen[:1], rejected[:1], ref_c[:1], ref_r[:1], beta=0.5, label_smoothing=0.1)
    # 0.9·log(1 + e^-0.5) + 0.1·log(1 + e^0.5)
    assert smoothed.item() == pytest.approx(0.9 * 0.474077 + 0.1 * 0.974077, abs=1e-6)
    ipo, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5, loss="ipo")
    # target margin 1/(2β) = 1: (1 − 1)² = 0 and (−2 − 1)² = 9
    assert ipo.item() == pytest.approx(4.5)
    with pytest.raises(ThinklingError, match="unknown preference loss"):
        dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5, loss="hinge-ish")


def test_gradient_raises_chosen_lowers_rejected_and_leaves_the_reference_alone():
    chosen, rejected, ref_c, ref_r = (t.clone().requires_grad_(True) for t in _pairs())
    loss, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected
    # d/dh of −log σ(βh) is −β·σ(−βh); the mean over 2 pairs halves it
    assert chosen.grad[0].item() == pytest.approx(-0.5 * (1 / (1 + math.exp(0.5))) / 2, abs=1e-6)
    assert ref_c.grad is None and ref_r.grad is None


def test_micro_batches_add_up_to_the_batch_loss():
    chosen, rejected, ref_c, ref_r = _pairs()
    whole, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.3)
    parts = sum(dpo_loss(chosen[i : i + 1], rejected[i : i + 1], ref_c[i : i + 1], ref_r[i : i + 1], beta=0.3,
                         denominator=2)[0] for i in range(2))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-7)


# -------------------------------------------------------------------------------- the pairs
def _completion(text: str, correct: bool) -> Completion:
    return Completion(text, [ord(ch) for ch in text], correct, text, True)


def _group(name: str, verdicts: list[bool]) -> Group:
    comps = [_completion(f"{name}{i}", ok) for i, ok in enumerate(verdicts)]
    return Group(Problem(name, "q", "a"), [1, 2], comps)


def test_pairs_are_made_only_of_a_right_and_a_wrong_completion_of_the_same_prompt():
    groups = [_group("all-right", [True] * 4), _group("all-wrong", [False] * 4),
              _group("one-right", [True, False, False, False]), _group("mixed", [True, True, False, False, True])]
    pairs = preference_pairs(groups, per_prompt=4, generator=torch.Generator().manual_seed(0))
    verdict = {tuple(c.ids): (g.problem.id, c.correct) for g in groups for c in g.completions}
    assert {p.problem_id for p in pairs} == {"one-right", "mixed"}  # no pair without both kinds
    for p in pairs:
        assert verdict[tuple(p.chosen)] == (p.problem_id, True)
        assert verdict[tuple(p.rejected)] == (p.problem_id, False)
        assert p.prefix == [1, 2]
    by_prompt = {name: [(tuple(p.chosen), tuple(p.rejected)) for p in pairs if p.problem_id == name]
                 for name in ("one-right", "mixed")}
    assert len(by_prompt["one-right"]) == 3  # one right × three wrong: three distinct pairs, no more
    assert len(by_prompt["mixed"]) == 3  # min(4, max(3 right, 2 wrong)): each right one used once
    assert len({c for c, _ in by_prompt["mixed"]}) == 3
    assert all(len(set(v)) == len(v) for v in by_prompt.values())  # no pair twice
    one = preference_pairs(groups, per_prompt=1, generator=torch.Generator().manual_seed(0))
    assert [p.problem_id for p in one] == ["one-right", "mixed"]


# ------------------------------------------------------------------- training on a small task
class Say(Task):
    """'say c' -> 'c', over a 10-token alphabet: a random model is right about 1 time in 10, so most
    groups of 8 hold a right and a wrong answer; the optimal policy reads the letter off the prompt."""

    name = "say"
    end_of_thinking = None

    def problems(self, n, seed, difficulty=None):
        return [Problem(f"say-{c}", f"say {c}", c) for c in "abcd"]

    def verify(self, problem, completion):
        return Verdict(completion.strip() == problem.answer, completion.strip())

    def format_ok(self, completion):
        return True


def _small_policy(seed: int = 0) -> TinyPolicy:
    tok = CharTokenizer("say bcd\n")
    config = TinyConfig.from_dict({"vocab_size": tok.vocab_size, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                   "max_seq_len": 16})
    torch.manual_seed(seed)
    return TinyPolicy(TinyTransformer(config), tok)


def _success(policy, problems, n: int = 100) -> float:
    outs = policy.generate([prompt_ids(policy, p) for p in problems] * n, SamplingParams(1, 1.0, 1.0, None, seed=123))
    return sum(Say().verify(p, policy.decode(o)).correct for p, o in zip(problems * n, outs)) / len(outs)


def _cfg(**over) -> DPOConfig:
    base = {"steps": 60, "prompts_per_round": 8, "group_size": 8, "pairs_per_prompt": 4, "beta": 0.1, "lr": 1e-2,
            "max_new_tokens": 1}
    return DPOConfig(**{**base, **over})


def test_rollout_dpo_learns_the_task_and_keeps_the_reference_frozen():
    task = Say()
    problems = task.problems(4, 0)
    policy, reference = _small_policy(), _small_policy()
    before = {k: v.clone() for k, v in reference.model.state_dict().items()}
    start = _success(policy, problems)
    seen = []
    trainer = train_dpo(policy, reference, task, problems, _cfg(), seed=0,
                        progress=lambda step, m: seen.append(m))
    end = _success(policy, problems)
    assert start < 0.2 and end >= 0.9, (start, end)  # (seeds 0-3: 0.08-0.09 -> 0.96-0.99)
    assert all(torch.equal(before[k], v) for k, v in reference.model.state_dict().items())  # frozen
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert trainer.totals["generated_tokens"] == 60 * 8 * 8  # one token per completion, a round per step
    # Learning shows in the implicit rewards too: the chosen side ends up above the rejected one.
    assert sum(m["rewards/margins"] for m in seen[-10:] if "pairs" in m and m["pairs"]) > 0


def test_a_round_without_a_mixed_group_skips_the_update():
    class Never(Say):
        def verify(self, problem, completion):
            return Verdict(False, completion)

    policy = _small_policy()
    weights = {k: v.clone() for k, v in policy.model.state_dict().items()}
    trainer = DPOTrainer(policy, _small_policy(), Never(), Never().problems(4, 0), _cfg(steps=1),
                         torch.optim.AdamW(policy.model.parameters(), lr=1e-2), seed=0)
    metrics = trainer.step(0, 1)
    assert metrics["skipped_update"] == 1 and metrics["pairs_built"] == 0
    assert all(torch.equal(weights[k], v) for k, v in policy.model.state_dict().items())


def test_resume_in_the_middle_of_a_round_equals_the_uninterrupted_run(tmp_path):
    """Checkpoint at step 3 with a round every 2 steps: the resumed step trains on the pairs the
    round made before the interruption (saved with the checkpoint), not on fresh ones."""
    from thinkling.models import load_policy
    from thinkling.train.common import load_optimizer_state, make_optimizer

    task = Say()
    problems = task.problems(4, 0)
    cfg = _cfg(steps=6, refresh_every=2, batch_size=5, save_every=3)

    def run(name: str, stop_after: int | None = None):
        folder = RunDir(tmp_path / name, cfg)
        policy = _small_policy()
        train_dpo(policy, _small_policy(), task, problems,
                  cfg if stop_after is None else _cfg(**{**vars(cfg), "steps": stop_after}), seed=0, run=folder)
        return folder, policy

    a, policy_a = run("a")
    b, _ = run("b", stop_after=3)
    ckpt = b.latest_checkpoint()
    state = b.load_state(ckpt)
    assert state["step"] == 3 and state["pairs"]
    b.truncate_metrics(state["metrics_rows"])
    policy_b = load_policy(ckpt / "policy")
    optimizer = make_optimizer(policy_b.model, cfg.lr, cfg.weight_decay)
    load_optimizer_state(optimizer, ckpt / "optimizer.pt")
    train_dpo(policy_b, _small_policy(), task, problems, cfg, seed=0, run=b, start_step=3, optimizer=optimizer,
              state=state)
    for name, w in policy_a.model.state_dict().items():
        assert torch.equal(w, policy_b.model.state_dict()[name]), name
    key = lambda run: [(r["step"], r.get("loss"), r.get("pairs_built")) for r in run.metrics()]  # noqa: E731
    assert key(a) == key(b) and len(a.metrics()) == 6


# --------------------------------------------------------------------------- the CLI verb
TINY = "model.tiny={d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 96}"
FAST = [TINY, "model.init=null", "train.size=16", "train.difficulty=[1]", "eval.size=4", "eval.difficulty=1",
        "eval.max_new_tokens=8", "eval.every=2", "dpo.steps=3", "dpo.prompts_per_round=2", "dpo.group_size=2",
        "dpo.max_new_tokens=8", "dpo.save_every=2"]


def test_dpo_verb_writes_a_run_folder_and_resumes(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["dpo", "recipes/quickstart/dpo.yaml", f"output_dir={out}", *FAST]) == 0
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "report.md", "final/policy.json",
                 "checkpoints/step_000003/state.json"):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "groups_sampled" in r] == [1, 2, 3]
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]  # the starting policy, evaluated
    assert rows[-1]["total/generated_tokens"] > 0
    assert main(["dpo", "recipes/quickstart/dpo.yaml", f"output_dir={out}", *FAST, "--resume"]) == 0
    assert main(["dpo", "recipes/quickstart/dpo.yaml", f"output_dir={out}", *FAST]) == 2  # exists: not overwritten
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("override, needle", [
    ("dpo.nope=1", "dpo.nope"), ("dpo.beta=0", "dpo.beta"), ("dpo.loss=hinge", "dpo.loss"),
    ("dpo.group_size=1", "dpo.group_size"), ("dpo.label_smoothing=0.5", "dpo.label_smoothing"),
    ("dpo.temperature=0", "dpo.temperature"), ("dpo.refresh_every=0", "dpo.refresh_every"),
    ("model.init=/nonexistent/x", "/nonexistent/x"),
])
def test_bad_dpo_input_is_one_line_and_writes_nothing(capsys, tmp_path, override, needle):
    code = main(["dpo", "recipes/quickstart/dpo.yaml", f"output_dir={tmp_path}/r", *FAST, override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_a_pipeline_stage_can_be_dpo(tmp_path):
    from thinkling.pipeline import stage_configs

    stages = stage_configs({"output_dir": str(tmp_path), "stages": [
        {"name": "sft", "kind": "sft"}, {"name": "pref", "kind": "dpo", "dpo": {"beta": 0.2}}]})
    assert [(n, k) for n, k, _ in stages] == [("sft", "sft"), ("pref", "dpo")]
    assert stages[1][2].dpo.beta == 0.2 and stages[1][2].model.init.endswith("1-sft/final")
