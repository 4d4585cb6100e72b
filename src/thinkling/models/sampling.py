"""Batched sampling for rollouts, one loop for every backend.

A backend supplies `prefill(prompts, steps) -> (state, logits)` for its distinct
prompts and a `DecodeState` that feeds one token per row and can keep or repeat
rows; `decode` does the rest, the same way for the tiny model and for Hugging
Face models:

- GRPO asks for G completions of each prompt: each distinct prompt (or BREAD
  prompt + anchor) is prefilled once and its state copied to its duplicates;
- rows that finish are fed padding until a quarter of the batch has finished,
  then the state is compacted to the live rows (one gather, so done rarely);
- with `params.early_stop`, a group of rows none of which can still succeed is stopped as if
  finished (`GroupStop`);
- `sample_tokens` draws every row's token in one call;
- with a seed, row i's uniforms come from a counter-based hash of (seed, key of row i, step)
  (`keyed_uniforms`), so a completion does not depend on the rest of the batch: evaluation
  batch sizes, BREAD's probe batches and data-parallel shards all sample the same tokens.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from thinkling.models.base import EarlyStop, Sample, SamplingParams

COMPACT_FRACTION = 0.25  # compact the batch once this share of its rows has finished


class DecodeState(Protocol):
    """A backend's per-row decoding state (KV cache, positions) for a batch of rows."""

    def select(self, rows: torch.Tensor) -> DecodeState:
        """The state of `rows` (repeat a row to duplicate a prompt, omit it to drop it)."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row `[B]`; returns the next-token logits `[B, V]` (float32)."""


Prefill = Callable[[list[list[int]], int], tuple[DecodeState, torch.Tensor]]


def decode(prompts: list[list[int]], params: SamplingParams, prefill: Prefill, *, eos_id: int, pad_id: int,
           budgets: list[int] | None = None, share_prompts: bool = True) -> list[Sample]:
    """One completion per prompt (ending with eos if emitted), sampled in one batch, with the
    log-probability of each token under the distribution it was drawn from.

    `prefill(unique_prompts, steps)` returns the state of the distinct prompts and their
    first-token logits; `steps` is the most new tokens any row may take. `budgets[i]` caps
    prompt i's new tokens (default: `params.max_new_tokens`); `share_prompts=False`
    prefills every row (for tests and benchmarks).
    """
    params.validate()
    budgets = [params.max_new_tokens] * len(prompts) if budgets is None else budgets
    out = [Sample([], []) for _ in prompts]
    todo = [i for i, b in enumerate(budgets) if b > 0]
    if not todo:
        return out
    row_of: dict = {}
    unique, first = [], []
    for i in todo:
        key = tuple(prompts[i]) if share_prompts else i
        if key not in row_of:
            row_of[key] = len(unique)
            unique.append(prompts[i])
        first.append(row_of[key])
    steps = max(budgets[i] for i in todo)
    state, logits = prefill(unique, steps)
    device = logits.device
    rows = torch.tensor(first, device=device)
    state, logits = state.select(rows), logits.index_select(0, rows)
    keys = torch.tensor(params.row_keys(len(prompts)), dtype=torch.long, device=device)

    def pick(logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if params.logits_processor is not None:
            logits = params.logits_processor(logits, history)
        u = None if params.seed is None else keyed_uniforms(params.seed, keys[origin[rows]], history.shape[1])
        return sample_tokens(logits, params.temperature, params.top_p, uniforms=u, with_logprobs=True)

    origin = torch.tensor(todo, device=device)  # prompt index of each batch row
    budget = torch.tensor([budgets[i] for i in todo], device=device)
    history = torch.full((len(todo), steps), pad_id, dtype=torch.long, device=device)
    history_logp = torch.zeros((len(todo), steps), dtype=torch.float32, device=device)
    alive = torch.ones(len(todo), dtype=torch.bool, device=device)
    stop = None if params.early_stop is None else GroupStop(params.early_stop, len(prompts), device)
    for t in range(steps):
        if bool(alive.all()):
            tokens, logp = pick(logits, history[:, :t], slice(None))
        else:
            live = alive.nonzero().squeeze(1)
            tokens, logp = torch.full_like(origin, pad_id), torch.zeros(len(origin), device=device)
            tokens[live], logp[live] = pick(logits[live], history[live, :t], live)
        history[:, t], history_logp[:, t] = tokens, logp
        finished = alive & ((tokens == eos_id) | (budget <= t + 1))
        if stop is not None:
            finished |= stop.retire(history, t, origin, alive, finished)
        if bool(finished.any()):
            for r in finished.nonzero().squeeze(1).tolist():
                out[int(origin[r])] = Sample(history[r, : t + 1].tolist(), history_logp[r, : t + 1].tolist())
            alive &= ~finished
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if len(alive) - n_alive >= COMPACT_FRACTION * len(alive):
                keep = alive.nonzero().squeeze(1)
                state = state.select(keep)
                origin, budget, history, history_logp, tokens, alive = (
                    x[keep] for x in (origin, budget, history, history_logp, tokens, alive))
        logits = state.step(tokens)
    return out


class GroupStop:
    """`EarlyStop` inside `decode`: which groups have no row left that can succeed.

    Being lost is for good, so a group needs one row that is not lost to stay (its witness):
    only the witness is asked at its line ends; when it is lost the others are asked about
    what they have so far, and one that is not lost becomes the witness. Every row is asked
    once more when it finishes (a finished right row keeps its group for good). That asks
    about one row per group and line instead of G, with the same outcome.
    """

    def __init__(self, rule: EarlyStop, n: int, device: torch.device):
        self.rule, self.lost = rule, [False] * n
        self.members: dict[int, list[int]] = {}
        for i, g in enumerate(rule.groups):
            self.members.setdefault(g, []).append(i)
        self.witness = {g: rows[0] for g, rows in self.members.items()}  # None once the group is kept or over
        self.group = torch.tensor(rule.groups, dtype=torch.long, device=device)
        self.check_after = torch.tensor(sorted(rule.check_after), dtype=torch.long, device=device)
        self.over = torch.zeros(max(rule.groups, default=-1) + 1, dtype=torch.bool, device=device)

    def retire(self, history: torch.Tensor, t: int, origin: torch.Tensor, alive: torch.Tensor,
               finished: torch.Tensor) -> torch.Tensor:
        """The live, unfinished rows to stop after step `t`: all rows of groups now known lost."""
        ask = finished.clone()
        if t > 0 and len(self.check_after):
            ask |= alive & torch.isin(history[:, t - 1], self.check_after)
        asked = ask.nonzero().squeeze(1).tolist()
        if not asked:  # most decode steps: no row finished or ended a line
            return torch.zeros_like(finished)
        prompts = origin.tolist()
        row_of = {i: r for r, i in enumerate(prompts)}
        newly = False
        for r in asked:
            i, done = prompts[r], bool(finished[r])
            g = self.rule.groups[i]
            if self.witness[g] is None or (i != self.witness[g] and not done):
                continue
            self.lost[i] = self.lost[i] or self.rule.lost(i, history[r, : t + 1].tolist(), done)
            if not self.lost[i]:
                if done:
                    self.witness[g] = None  # finished right: the group is kept whatever the others do
                continue
            if i != self.witness[g]:
                continue
            self.witness[g] = next((j for j in self.members[g] if not self._lost_now(j, history, t, row_of, alive)),
                                   None)
            if self.witness[g] is None:
                self.over[g], newly = True, True
        if not newly:
            return torch.zeros_like(finished)
        return alive & ~finished & self.over[self.group[origin]]

    def _lost_now(self, i: int, history: torch.Tensor, t: int, row_of: dict, alive: torch.Tensor) -> bool:
        """Whether prompt i is lost: asked about what it has so far if it is still sampling
        (a finished row was asked when it finished)."""
        if not self.lost[i] and i in row_of and bool(alive[row_of[i]]):
            self.lost[i] = self.rule.lost(i, history[row_of[i], : t + 1].tolist(), False)
        return self.lost[i]


def keyed_uniforms(seed: int, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) (float64) per key, a pure function of (seed, key, step).

    A splitmix64 hash of a counter (the same mixing Java's SplittableRandom uses), computed on
    int64 tensors with logical shifts; 53 bits of it make the double.
    """
    def shift(x: torch.Tensor, s: int) -> torch.Tensor:
        return (x >> s) & ((1 << (64 - s)) - 1)  # logical right shift of int64

    x = keys.long() * _signed(0x9E3779B97F4A7C15) + _signed((seed * 0xD1B54A32D192ED03 + step * 0x94D049BB133111EB)
                                                             & 0xFFFFFFFFFFFFFFFF)
    x = (x ^ shift(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ shift(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ shift(x, 31)
    return shift(x, 11).double() * 2.0**-53


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 it is."""
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None,
                  with_logprobs: bool = False, uniforms: torch.Tensor | None = None):
    """One token per row of `logits [B, V]`: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of
    most likely tokens with mass >= top_p, renormalised).

    The draw inverts the CDF with one uniform per row: the same distribution as
    `torch.multinomial`, whose exponential draws over a 49k vocabulary cost more
    than a decode step's attention. `uniforms` `[B]` (float64 in [0, 1)) replace the draws from
    `generator`. `with_logprobs` also returns each drawn token's log-probability under that
    distribution (under softmax(logits) for argmax).
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        if not with_logprobs:
            return tokens
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    z = logits if temperature == 1 else logits / temperature
    order = None
    if top_p < 1:
        weights, order = torch.softmax(z, dim=-1).sort(dim=-1, descending=True)
        weights[(weights.cumsum(dim=-1) - weights) >= top_p] = 0
    else:  # exp(z - max z): softmax without its division, whose sum the CDF inversion computes anyway
        weights = (z - z.amax(dim=-1, keepdim=True)).exp_()
    if uniforms is None:
        uniforms = torch.rand(weights.shape[0], dtype=torch.float64, generator=generator, device=weights.device)
    picked, total = _invert_cdf(weights, uniforms.to(weights.device)[:, None])
    tokens = picked if order is None else order.gather(1, picked[:, None]).squeeze(1)
    if not with_logprobs:
        return tokens
    return tokens, (weights.gather(1, picked[:, None]).squeeze(1).double().log() - total.log()).float()


def _invert_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The token whose CDF interval holds `u * total`, per row of non-negative `weights [B, V]`,
    and the total (float64 `[B]`).

    Two levels: pick the block of `block` tokens from the cumulative block masses (float64),
    then the token inside it (float64). A float64 cumsum over the whole vocabulary costs ~10x
    more (it is sequential), and so does summing the blocks in float64 (a float32 sum of 256
    terms is within ~1e-7 of it, the rounding the float32 weights already carry); a float32
    cumsum over the vocabulary would shift rare tokens' probabilities by ~1e-5.
    """
    B, V = weights.shape
    blocks = (weights if V % block == 0 else F.pad(weights, (0, -V % block))).view(B, -1, block)
    mass = blocks.sum(dim=-1).double()
    ends = mass.cumsum(dim=-1)
    target = u * ends[:, -1:]
    b = torch.searchsorted(ends, target, right=True).clamp(max=ends.shape[1] - 1)
    start = ends.gather(1, b) - mass.gather(1, b)
    inside = blocks[torch.arange(B, device=weights.device), b.squeeze(1)].double().cumsum(dim=-1) + start
    i = torch.searchsorted(inside, target, right=True).clamp(max=block - 1)
    tokens = (b * block + i).squeeze(1)
    # float rounding at an interval edge can land on a zero-weight token: take the mode instead
    bad = (tokens >= V) | (weights.gather(1, tokens.clamp(max=V - 1)[:, None]).squeeze(1) == 0)
    if bool(bad.any()):
        tokens[bad] = weights[bad].argmax(dim=-1)
    return tokens, ends[:, -1]
