"""Stopping control at inference: temperature-scaled stopping (TS) and s1 budget forcing.

Both are `LogitsProcessor`s (see `thinkling.models.base`): each call sees the
next-token logits `[B, V]` and the completion ids generated so far `[B, t]` of
the rows still running. They keep no state between calls and read everything
from that history, so the generator may drop or reorder rows between steps.

The end of thinking is a sequence of token ids: one id for `</think>` or EOS,
two for the synthetic tasks' "A:" under the character tokenizer.

Line-based tasks (`Task.line_based`: the synthetic tasks, whose answer line
`A:<n>` must start a line) get line-aware budget forcing: the marker is only
ever forced at the start of a line, never in the middle of one.
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


def _line_length(history: torch.Tensor, line_end: int) -> torch.Tensor:
    """Tokens written since the last `line_end` in each row (long `[B]`); the completion starts a line."""
    b, t = history.shape
    positions = torch.arange(-1, t, device=history.device).expand(b, t + 1)  # -1: before the completion
    newline = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=history.device), history == line_end], dim=1)
    return t - 1 - torch.where(newline, positions, -1).max(dim=1).values


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
      max_new_tokens > budget + `max_overrun` + the answer.
    - With `wait` ids and `max_waits` > 0, while fewer than `min_tokens` tokens are
      generated (default: the budget) and the trace holds fewer than `max_waits`
      wait sequences, the probability of starting the marker is moved onto the
      first wait token (log-sum-exp), and a wait sequence begun there is forced to
      its end. So where the model would have stopped it writes "Wait" instead and
      keeps thinking. Pick a wait sequence whose first token the model does not
      otherwise write while thinking ("Wait" rather than "\\nWait" for a character
      model): a first wait token sampled in that window is always completed.
    - With `line_end` (the newline id; set for line-based tasks), the marker is
      forced only at the start of a line. Why: the synthetic tasks' verifier needs
      the answer line `A:<n>` to start a line, so a marker forced mid-line
      (`check 93-6=8A:87`) is a format failure, and a character model cut
      mid-line often ignores the marker or answers from a half-written step. A
      row over budget in the middle of a line may finish it on its own for up to
      `line_grace` more tokens (counted from the budget); after that the newline
      is forced. At a line start the marker is forced as above. A row writes at
      most `max_overrun` tokens past the budget before its thinking is over.
    """

    end_of_thinking: tuple[int, ...]
    budget: int
    wait: tuple[int, ...] = ()
    max_waits: int = 0
    min_tokens: int | None = None
    line_end: int | None = None
    line_grace: int = 0

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
        if self.line_end is not None:
            _ids((self.line_end,), "line_end")
            if self.line_end in self.end_of_thinking:
                raise ThinklingError("line_end must not be a token of the end-of-thinking marker")
        if not isinstance(self.line_grace, int) or isinstance(self.line_grace, bool) or self.line_grace < 0:
            raise ThinklingError(f"line_grace must be an integer >= 0, got {self.line_grace!r}")

    @property
    def max_overrun(self) -> int:
        """The most tokens a row writes past the budget until its marker is complete."""
        return len(self.end_of_thinking) + (self.line_grace + 1 if self.line_end is not None else 0)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        marker, t = self.end_of_thinking, history.shape[1]
        thinking = _occurrences(history, marker) == 0
        out = logits.clone()
        if t >= self.budget:
            begun = _open_prefix(history, marker)
            next_marker = torch.tensor(marker, device=logits.device)[begun]
            if self.line_end is None:
                _force(out, thinking, next_marker)
                return out
            # At a line start, or with a marker begun right at one: (continue to) force the marker.
            at_line_start = _line_length(history, self.line_end) == begun
            _force(out, thinking & at_line_start, next_marker)
            # Mid-line: let the row end the line itself, then force the newline once the grace is used up.
            if t >= self.budget + self.line_grace:
                _force(out, thinking & ~at_line_start, torch.full_like(begun, self.line_end))
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


# Tokens a row over budget may use to finish its current line before the newline is forced
# (line-based tasks): enough for a `chain` / `chain_verbose` step line (<= 15 characters);
# a longer line gets its newline forced after the grace.
LINE_GRACE = 16


def make_stop_processor(policy, task, *, ts_alpha: float = 1.0, budget: int | None = None,
                        wait: str | None = None, max_waits: int = 0,
                        min_tokens: int | None = None, line_grace: int = LINE_GRACE) -> LogitsProcessor | None:
    """The processor for TS (`ts_alpha` != 1) and/or budget forcing (`budget` set); None if neither.

    The marker is `task.end_of_thinking` encoded as continuation text, or the
    policy's EOS when the task has none. When the task is line-based
    (`task.line_based`) and has a text marker, budget forcing is line-aware
    (see `BudgetForcing`): the answer marker is forced only at a line start,
    after up to `line_grace` tokens to finish the current line. Budget forcing
    runs last, so a forced token wins over the TS boost.
    """
    text = getattr(task, "end_of_thinking", "")
    marker = tuple(policy.encode_text(text)) if text else (policy.eos_id,)
    line_end = None
    if text and getattr(task, "line_based", False):
        # The last id: sentencepiece tokenizers may put a bare "▁" piece before the newline byte.
        line_end = policy.encode_text("\n")[-1]
        if line_end in marker:  # a marker like "\nA:" starts its own line
            line_end = None
    processors: list[LogitsProcessor] = []
    if ts_alpha != 1.0:
        processors.append(TemperatureScaledStopping(marker, ts_alpha))
    if budget is not None:
        wait_ids = tuple(policy.encode_text(wait)) if wait else ()
        processors.append(BudgetForcing(marker, budget, wait_ids, max_waits, min_tokens,
                                        line_end=line_end, line_grace=line_grace if line_end is not None else 0))
    if not processors:
        return None
    return processors[0] if len(processors) == 1 else _Chain(*processors)
