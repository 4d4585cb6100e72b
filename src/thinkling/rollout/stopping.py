"""Stopping control at inference: temperature-scaled stopping (TS) and s1 budget forcing.

Both are `LogitsProcessor`s (see `thinkling.models.base`): each call sees the
next-token logits `[B, V]` and the completion ids generated so far `[B, t]` of
the rows still running. They keep no state between calls and read everything
from that history, so the generator may drop or reorder rows between steps.

The end of thinking is a sequence of token ids: one id for `</think>` or EOS,
two for the synthetic tasks' "A:" under the character tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from thinkling.errors import ThinklingError
from thinkling.models.base import LogitsProcessor


def _ids(ids: Sequence[int], key: str) -> tuple[int, ...]:
    ids = tuple(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ThinklingError(f"{key} must be token ids (non-negative ints), got {ids!r}")
    return ids


def _occurrences(history: torch.Tensor, seq: tuple[int, ...]) -> torch.Tensor:
    """How many times `seq` appears in each row of `history` (long `[B]`)."""
    n = len(seq)
    if history.shape[1] < n:
        return torch.zeros(history.shape[0], dtype=torch.long, device=history.device)
    windows = history.unfold(1, n, 1)  # [B, t-n+1, n]
    return (windows == torch.tensor(seq, device=history.device)).all(dim=-1).sum(dim=-1)


def _open_prefix(history: torch.Tensor, seq: tuple[int, ...]) -> torch.Tensor:
    """Length k < len(seq) of the longest prefix of `seq` that each row ends with (long `[B]`)."""
    b, t = history.shape
    out = torch.zeros(b, dtype=torch.long, device=history.device)
    for k in range(1, min(len(seq) - 1, t) + 1):
        hit = (history[:, t - k :] == torch.tensor(seq[:k], device=history.device)).all(dim=-1)
        out[hit] = k
    return out


def _force(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """In place: row r of `rows` may only emit `tokens[r]`."""
    idx = rows.nonzero(as_tuple=True)[0]
    logits[idx] = float("-inf")
    logits[idx, tokens[idx]] = 0.0


@dataclass(frozen=True)
class TemperatureScaledStopping:
    """Multiply the probability of ending the thinking by `alpha`: logit[eot] += log α.

    Acts from the first generated token on, on rows that have not written the
    end-of-thinking marker yet (after it comes the answer, which α would only
    distort). For a multi-token marker the boost goes to its FIRST token: that is
    where the model decides to stop, the rest of the marker follows almost surely,
    so P(marker) ≈ P(first token) and the stopping probability scales by ≈ α.
    Boosting a later token (":" of "A:") would plant stray fragments in the
    thinking instead. While a marker is half written the boost pauses.
    α > 1 stops earlier, α < 1 later, α = 1 changes nothing.
    """

    end_of_thinking: tuple[int, ...]
    alpha: float

    def __post_init__(self):
        object.__setattr__(self, "end_of_thinking", _ids(self.end_of_thinking, "end_of_thinking"))
        if not self.end_of_thinking:
            raise ThinklingError("end_of_thinking must have at least one token id")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ThinklingError(f"ts_alpha must be a positive number, got {self.alpha!r}")

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        marker = self.end_of_thinking
        thinking = (_occurrences(history, marker) == 0) & (_open_prefix(history, marker) == 0)
        out = logits.clone()
        out[:, marker[0]] += thinking.to(out.dtype) * math.log(self.alpha)
        return out


@dataclass(frozen=True)
class BudgetForcing:
    """s1 budget forcing: cap the thinking at `budget` tokens, optionally stretch it with "Wait".

    - A row that has generated `budget` tokens without writing the end-of-thinking
      marker is made to write it, one token per step (all other logits -inf; a
      marker the row already began is completed, not restarted). After that the
      model is free and writes the answer, so generation needs room for it:
      max_new_tokens > budget + len(marker) + the answer.
    - With `wait` ids and `max_waits` > 0, while fewer than `min_tokens` tokens are
      generated (default: the budget) and the trace holds fewer than `max_waits`
      wait sequences, the probability of starting the marker is moved onto the
      first wait token (log-sum-exp), and a wait sequence begun there is forced to
      its end. So where the model would have stopped it writes "Wait" instead and
      keeps thinking. Pick a wait sequence whose first token the model does not
      otherwise write while thinking ("Wait" rather than "\\nWait" for a character
      model): a first wait token sampled in that window is always completed.
    """

    end_of_thinking: tuple[int, ...]
    budget: int
    wait: tuple[int, ...] = ()
    max_waits: int = 0
    min_tokens: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "end_of_thinking", _ids(self.end_of_thinking, "end_of_thinking"))
        object.__setattr__(self, "wait", _ids(self.wait, "wait"))
        if not self.end_of_thinking:
            raise ThinklingError("end_of_thinking must have at least one token id")
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ThinklingError(f"budget must be a positive integer, got {self.budget!r}")
        if not isinstance(self.max_waits, int) or self.max_waits < 0:
            raise ThinklingError(f"max_waits must be an integer >= 0, got {self.max_waits!r}")
        if self.max_waits > 0 and not self.wait:
            raise ThinklingError("max_waits > 0 needs the wait token ids")
        if self.wait and self.wait[0] == self.end_of_thinking[0]:
            raise ThinklingError("wait must not start with the end-of-thinking token")
        min_tokens = self.min_tokens
        if min_tokens is not None and not (isinstance(min_tokens, int) and 0 <= min_tokens <= self.budget):
            raise ThinklingError(f"min_tokens must be an integer in [0, budget={self.budget}], got {self.min_tokens!r}")

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        marker, t = self.end_of_thinking, history.shape[1]
        thinking = _occurrences(history, marker) == 0
        out = logits.clone()
        if t >= self.budget:
            next_marker = torch.tensor(marker, device=logits.device)[_open_prefix(history, marker)]
            _force(out, thinking, next_marker)
            return out
        if self.max_waits == 0:
            return out
        min_tokens = self.budget if self.min_tokens is None else self.min_tokens
        waiting = thinking & (_occurrences(history, self.wait) < self.max_waits)
        begun = _open_prefix(history, self.wait)
        finish = waiting & (begun > 0) & (t - begun < min_tokens)
        _force(out, finish, torch.tensor(self.wait, device=logits.device)[begun])
        redirect = waiting & (begun == 0) & (t < min_tokens)
        eot, w = marker[0], self.wait[0]
        out[redirect, w] = torch.logaddexp(out[redirect, w], out[redirect, eot])
        out[redirect, eot] = float("-inf")
        return out


class _Chain:
    """Apply processors in order (the later one has the last word)."""

    def __init__(self, *processors: LogitsProcessor):
        self.processors = processors

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        for p in self.processors:
            logits = p(logits, history)
        return logits


def make_stop_processor(policy, task, *, ts_alpha: float = 1.0, budget: int | None = None,
                        wait: str | None = None, max_waits: int = 0,
                        min_tokens: int | None = None) -> LogitsProcessor | None:
    """The processor for TS (`ts_alpha` != 1) and/or budget forcing (`budget` set); None if neither.

    The marker is `task.end_of_thinking` encoded as continuation text, or the
    policy's EOS when the task has none. Budget forcing runs last, so a forced
    token wins over the TS boost.
    """
    text = getattr(task, "end_of_thinking", "")
    marker = tuple(policy.encode_text(text)) if text else (policy.eos_id,)
    processors: list[LogitsProcessor] = []
    if ts_alpha != 1.0:
        processors.append(TemperatureScaledStopping(marker, ts_alpha))
    if budget is not None:
        wait_ids = tuple(policy.encode_text(wait)) if wait else ()
        processors.append(BudgetForcing(marker, budget, wait_ids, max_waits, min_tokens))
    if not processors:
        return None
    return processors[0] if len(processors) == 1 else _Chain(*processors)
