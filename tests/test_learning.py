"""RL must learn, not only compute the right numbers: from random initialisation, every
GRPO-family algorithm reaches a known optimal policy within a fixed budget (seconds on a CPU)."""

from __future__ import annotations

import pytest

from thinkling.config import RLConfig
from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyPolicy
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


def sampled_success(policy, task, problems, n: int = 50) -> float:
    prompts = [prompt_ids(policy, p) for p in problems] * n
    outs = policy.generate(prompts, SamplingParams(1, 1.0, 1.0, None, seed=123))
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
