"""CoT2, continuous chain of thought (arXiv 2505.23648), on minimum non-negative sum.

Token layout. The lab's mnns model has its own small vocabulary so that one
reasoning step is one token: `<bos> d1 .. dm <think>` is the prompt (digit
tokens 1..max_digit), then m-1 *partial-sum* tokens, then the answer, itself a
partial-sum token (the final sum). Value tokens cover -m·max_digit..m·max_digit.

- Discrete CoT feeds the embedding of one sampled partial sum per step and is
  trained by ordinary SFT on one optimal trace.
- CoT2 feeds `z_t = Eᵀ softmax(logits_t)`, a mixture of partial-sum embeddings,
  and is trained by CSFT: teacher-forced on the target mixtures `Eᵀ α*_t`, with
  `KL(α*_t ‖ softmax(logits_t))` on the steps and cross-entropy on the answer,
  where `α*_t` is the empirical distribution of the t-th partial sum over a set
  of traces ("all" sign assignments: the search the model should run in
  superposition; or only the "optimal" ones). With one-hot `α*` this is SFT.
- Multi-token sampling (MTS) draws K tokens per step from the policy and feeds
  the mean of their embeddings; the log-probability of a step is the sum over
  its K tokens, so the PPO ratio is the product of the K token ratios. K = 1 is
  discrete CoT. GRPO on the answer reward trains through it.

The model is the library's `TinyTransformer`, driven through `inputs_embeds`.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinkling.algorithms import compute_advantages, policy_loss
from thinkling.errors import ThinklingError
from thinkling.models.tiny import TinyConfig, TinyTransformer
from thinkling.tasks.mnns import optimal_signs
from thinkling.train.common import lr_at, make_optimizer, set_lr, step_generator

TRACE_SETS = ("all", "optimal")


@dataclass(frozen=True)
class MNNSLayout:
    """Token ids: `<bos>`=0, `<think>`=1, digits 1..max_digit, then the value tokens."""

    m: int = 4
    max_digit: int = 9
    bos: int = 0
    think: int = 1

    def digit(self, d: int) -> int:
        return 1 + d

    @property
    def max_value(self) -> int:
        return self.m * self.max_digit

    def value(self, v: int) -> int:
        return 2 + self.max_digit + v + self.max_value

    @property
    def vocab_size(self) -> int:
        return self.value(self.max_value) + 1

    @property
    def soft_steps(self) -> int:
        return self.m - 1

    def prompt(self, digits) -> list[int]:
        return [self.bos, *map(self.digit, digits), self.think]


@dataclass
class MNNSData:
    """A problem set as tensors: prompts `[N, m+2]`, step targets α* `[N, m-1, V]`,
    one optimal trace `[N, m-1]` (discrete CoT's target) and answers `[N]`."""

    prompts: torch.Tensor
    targets: torch.Tensor
    trace: torch.Tensor
    answer: torch.Tensor

    def __len__(self) -> int:
        return len(self.answer)

    def rows(self, idx) -> MNNSData:
        return MNNSData(self.prompts[idx], self.targets[idx], self.trace[idx], self.answer[idx])


def partial_sums(digits, signs) -> list[int]:
    return list(itertools.accumulate(s * d for s, d in zip(signs, digits)))


def make_data(layout: MNNSLayout, problems: list[tuple[int, ...]], traces: str = "all") -> MNNSData:
    """Tensors for `problems` (digit tuples); `traces` picks the set α* is the distribution over."""
    if traces not in TRACE_SETS:
        raise ThinklingError(f"cot2 'traces': must be one of {', '.join(TRACE_SETS)} (got {traces!r})")
    S, V = layout.soft_steps, layout.vocab_size
    targets = torch.zeros(len(problems), S, V)
    trace = torch.zeros(len(problems), S, dtype=torch.long)
    answer = torch.zeros(len(problems), dtype=torch.long)
    for i, digits in enumerate(problems):
        if len(digits) != layout.m or not all(1 <= d <= layout.max_digit for d in digits):
            raise ThinklingError(f"cot2: problem {digits} does not have {layout.m} digits in 1..{layout.max_digit}")
        best = optimal_signs(digits)
        signs = best if traces == "optimal" else list(itertools.product((1, -1), repeat=layout.m))
        for s in signs:
            for t, v in enumerate(partial_sums(digits, s)[:S]):
                targets[i, t, layout.value(v)] += 1.0 / len(signs)
        sums = partial_sums(digits, best[0])
        trace[i] = torch.tensor([layout.value(v) for v in sums[:S]])
        answer[i] = layout.value(sums[-1])
    prompts = torch.tensor([layout.prompt(d) for d in problems])
    return MNNSData(prompts, targets, trace, answer)


def split_problems(layout: MNNSLayout, test_fraction: float, seed: int) -> tuple[list, list]:
    """Every digit tuple, shuffled and split: test problems are never seen in training."""
    problems = list(itertools.product(range(1, layout.max_digit + 1), repeat=layout.m))
    random.Random(f"cot2:{seed}").shuffle(problems)
    n_test = round(test_fraction * len(problems))
    return problems[n_test:], problems[:n_test]


def new_model(layout: MNNSLayout, d_model: int, n_layers: int = 2, n_heads: int = 2, seed: int = 0) -> TinyTransformer:
    config = TinyConfig(vocab_size=layout.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                        max_seq_len=layout.m + 2 + layout.soft_steps + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyTransformer(config)


# ----------------------------------------------------------------------- training


def mixture(model: TinyTransformer, dists: torch.Tensor) -> torch.Tensor:
    """`Eᵀ α`: the continuous token of distributions `[..., V]`."""
    return dists @ model.embed.weight


def csft_loss(model: TinyTransformer, prompts: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Mean over the m-1 steps and the answer of KL(α*_t ‖ softmax(logits_t)) and the answer's cross-entropy.

    Teacher-forced: the soft steps' inputs are the target mixtures. With one-hot
    targets this is token-mean SFT cross-entropy on the trace and the answer.
    """
    P, S = prompts.shape[1], targets.shape[1]
    inputs = torch.cat((model.embed(prompts), mixture(model, targets)), dim=1)
    logp = torch.log_softmax(model(inputs_embeds=inputs)[:, P - 1 :].float(), dim=-1)  # S steps, then the answer
    kl = (torch.xlogy(targets, targets) - targets * logp[:, :S]).sum(-1)
    ce = -logp[:, S].gather(-1, answer[:, None]).squeeze(-1)
    return (kl.sum(1) + ce).mean() / (S + 1)


def train_supervised(model: TinyTransformer, data: MNNSData, *, mode: str, steps: int, batch_size: int = 256,
                     lr: float = 3e-3, warmup: int = 100, seed: int = 0) -> list[float]:
    """CSFT (`mode="cot2"`, targets α*) or SFT on one optimal trace (`mode="discrete"`); returns the losses."""
    if mode not in ("cot2", "discrete"):
        raise ThinklingError(f"cot2 'mode': must be 'cot2' or 'discrete' (got {mode!r})")
    optimizer = make_optimizer(model, lr, 0.0)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=step_generator(seed, step))
        batch = data.rows(idx)
        targets = batch.targets if mode == "cot2" else F.one_hot(batch.trace, model.config.vocab_size).float()
        set_lr(optimizer, lr_at(step, base_lr=lr, warmup=warmup, total=steps))
        loss = csft_loss(model, batch.prompts, targets, batch.answer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------- decoding


@dataclass
class Rollout:
    """Sampled steps `tokens [B, m-1, K]`, the answer `[B]` and their log-probs `[B, m]` under the sampler."""

    tokens: torch.Tensor
    answer: torch.Tensor
    logp: torch.Tensor


def _step_logits(model, inputs_embeds, cache) -> torch.Tensor:
    return model(inputs_embeds=inputs_embeds, cache=cache)[:, -1].float()


@torch.no_grad()
def soft_decode(model: TinyTransformer, prompts: torch.Tensor) -> torch.Tensor:
    """CoT2 inference: m-1 soft steps `Eᵀ softmax(logits)`, then the greedy answer token `[B]`."""
    steps = model.config.max_seq_len - prompts.shape[1] - 1
    cache = model.new_cache(len(prompts), model.config.max_seq_len)
    logits = model(prompts, cache=cache)[:, -1].float()
    for _ in range(steps):
        logits = _step_logits(model, mixture(model, logits.softmax(-1))[:, None], cache)
    return logits.argmax(-1)


@torch.no_grad()
def sample_discrete(model: TinyTransformer, prompts: torch.Tensor, generator=None, greedy: bool = False) -> Rollout:
    """Discrete CoT: sample (or argmax) one token per step and feed its id."""
    steps = model.config.max_seq_len - prompts.shape[1] - 1
    cache = model.new_cache(len(prompts), model.config.max_seq_len)
    logits = model(prompts, cache=cache)[:, -1].float()
    tokens, logps = [], []
    for t in range(steps + 1):
        logp = torch.log_softmax(logits, -1)
        tok = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        logps.append(logp.gather(-1, tok[:, None]).squeeze(-1))
        tokens.append(tok)
        if t < steps:
            logits = model(tok[:, None], cache=cache)[:, -1].float()
    return Rollout(torch.stack(tokens[:-1], 1)[..., None], tokens[-1], torch.stack(logps, 1))


@torch.no_grad()
def sample_multi_token(model: TinyTransformer, prompts: torch.Tensor, K: int, generator=None) -> Rollout:
    """MTS: K tokens per step from the policy, their mean embedding fed back; one answer token."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ThinklingError(f"cot2 'K': must be an integer >= 1 (got {K!r})")
    steps = model.config.max_seq_len - prompts.shape[1] - 1
    cache = model.new_cache(len(prompts), model.config.max_seq_len)
    logits = model(prompts, cache=cache)[:, -1].float()
    tokens, logps = [], []
    for _ in range(steps):
        logp = torch.log_softmax(logits, -1)
        tok = torch.multinomial(logp.exp(), K, replacement=True, generator=generator)
        tokens.append(tok)
        logps.append(logp.gather(-1, tok).sum(-1))
        logits = _step_logits(model, model.embed(tok).mean(1, keepdim=True), cache)
    logp = torch.log_softmax(logits, -1)
    answer = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    logps.append(logp.gather(-1, answer[:, None]).squeeze(-1))
    return Rollout(torch.stack(tokens, 1), answer, torch.stack(logps, 1))


def rollout_logprobs(model: TinyTransformer, prompts: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """log π_θ of each step (sum over its K tokens) and of the answer, `[B, m]`, with gradients.

    One teacher-forced pass: each step's input is the mean embedding of its
    sampled tokens under the current embedding matrix.
    """
    P = prompts.shape[1]
    inputs = torch.cat((model.embed(prompts), model.embed(rollout.tokens).mean(2)), dim=1)
    logp = torch.log_softmax(model(inputs_embeds=inputs)[:, P - 1 :].float(), dim=-1)
    steps = logp[:, :-1].gather(-1, rollout.tokens).sum(-1)
    return torch.cat((steps, logp[:, -1].gather(-1, rollout.answer[:, None])), dim=1)


def train_grpo(model: TinyTransformer, data: MNNSData, *, K: int, steps: int, prompts_per_step: int = 32,
               group_size: int = 8, lr: float = 1e-4, epochs: int = 2, eps: float = 0.2, seed: int = 0,
               on_step=None) -> list[float]:
    """GRPO with multi-token sampling and the answer reward (1 if correct); returns the mean rewards."""
    optimizer = make_optimizer(model, lr, 0.0)
    rewards_log = []
    for step in range(steps):
        gen = step_generator(seed, step)
        idx = torch.randint(len(data), (prompts_per_step,), generator=gen).repeat_interleave(group_size)
        prompts = data.prompts[idx]
        model.eval()
        rollout = sample_multi_token(model, prompts, K, generator=gen)
        rewards = (rollout.answer == data.answer[idx]).float()
        advantages = compute_advantages("grpo", rewards.view(prompts_per_step, group_size)).flatten()
        model.train()
        for _ in range(epochs):
            logp = rollout_logprobs(model, prompts, rollout)
            loss, _ = policy_loss(logp, rollout.logp, advantages, torch.ones_like(logp), eps_low=eps, eps_high=eps,
                                  aggregation="seq-mean-token-mean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        rewards_log.append(rewards.mean().item())
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return rewards_log
