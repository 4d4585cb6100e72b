"""RL must learn, not only compute the right numbers: from random initialisation, every
GRPO-family algorithm reaches a known optimal policy within a fixed budget (seconds on a CPU)."""

from __future__ import annotations

import pytest
import torch

from thinkling.config import BreadConfig, RLConfig
from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyConfig, TinyPolicy, TinyTransformer
from thinkling.models.tokenizer import CharTokenizer
from thinkling.rollout.prompts import prompt_ids
from thinkling.tasks.base import Problem, Task, Verdict
from thinkling.train.rl import resolve_knobs, train_rl


class Echo(Task):
    """'say c' -> 'c': the optimal policy answers the letter named in the prompt. A random
    model is right ~1 % of the time, and must learn to read the prompt, not one answer."""

    name = "echo"
    end_of_thinking = None

    def problems(self, n, seed, difficulty=None):
        return [Problem(f"echo-{c}", f"say {c}", c) for c in "abcd"]

    def verify(self, problem, completion):
        return Verdict(completion.strip() == problem.answer, completion.strip())

    def format_ok(self, completion):
        return True


def sampled_success(policy, task, problems, n: int = 50, max_new_tokens: int = 1) -> float:
    prompts = [prompt_ids(policy, p) for p in problems] * n
    outs = policy.generate(prompts, SamplingParams(max_new_tokens, 1.0, 1.0, None, seed=123))
    return sum(task.verify(p, policy.decode(o)).correct for p, o in zip(problems * n, outs)) / len(outs)


@pytest.mark.parametrize("algorithm, over", [("grpo", {}), ("dr_grpo", {}), ("grpo", {"advantage": "rloo"}),
                                             ("dapo", {})])
def test_each_algorithm_learns_the_optimal_policy(algorithm, over):
    task = Echo()
    problems = task.problems(4, 0)
    policy = TinyPolicy.create({"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32}, seed=0)
    start = sampled_success(policy, task, problems)
    cfg = RLConfig(algorithm=algorithm, steps=150, prompts_per_step=8, group_size=8, lr=3e-3, max_new_tokens=1,
                   kl_to_start=False, **over)
    train_rl(policy, task, problems, cfg, resolve_knobs(cfg), seed=0)
    end = sampled_success(policy, task, problems)
    assert start < 0.05 and end >= 0.9, (start, end)


class Repeat(Task):
    """'c' -> the letter eight times (line breaks ignored). Every letter is the same skill (copy the
    one before), as every step of a chain problem is. A random model writes those eight letters
    about once in 10^7 samples, so plain GRPO sees no success; BREAD's anchors (the first k lines
    written for it) leave a suffix short enough to guess, and what it learns there carries over
    to earlier lines, so the anchors shorten until it needs none."""

    name = "repeat"
    end_of_thinking = None

    def problems(self, n, seed, difficulty=None):
        return [Problem(f"repeat-{c}", c, c * 8, steps=tuple(c * 8)) for c in "abcd"]

    def verify(self, problem, completion):
        letters = completion.replace("\n", "")[: len(problem.answer)]
        return Verdict(letters == problem.answer, letters)

    def format_ok(self, completion):
        return True


def test_bread_learns_where_grpo_never_sees_a_success():
    task = Repeat()
    problems = task.problems(4, 0)

    def fresh():
        tok = CharTokenizer("\nabcd")  # a small alphabet: a suffix of one or two letters is guessable
        config = TinyConfig.from_dict({"vocab_size": tok.vocab_size, "d_model": 32, "n_layers": 1, "n_heads": 2,
                                       "max_seq_len": 40})
        torch.manual_seed(0)
        return TinyPolicy(TinyTransformer(config), tok)

    def run(bread: bool):
        policy, successes = fresh(), []
        cfg = RLConfig(steps=150, prompts_per_step=4, group_size=8, lr=3e-3, max_new_tokens=16, kl_to_start=False,
                       bread=BreadConfig(enabled=bread))
        train_rl(policy, task, problems, cfg, resolve_knobs(cfg), seed=0,
                 progress=lambda step, m: successes.append(m.get("accuracy", 0.0)))
        return sampled_success(policy, task, problems, n=100, max_new_tokens=16), successes

    grpo_end, grpo_seen = run(bread=False)
    bread_end, _ = run(bread=True)
    assert grpo_end < 0.05 and sum(grpo_seen) / len(grpo_seen) < 0.01, (grpo_seen, grpo_end)  # (seed 0: none)
    assert bread_end >= 0.9, bread_end  # (0.9775-0.98 over seeds 0-3)
