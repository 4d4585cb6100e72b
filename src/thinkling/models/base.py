"""The policy interface every model backend implements.

Trainers, rollouts, rewards and evaluation only talk to this interface, so the
tiny from-scratch transformer and a Hugging Face model are a swap, not a fork.

Conventions:
- token ids are plain `list[int]` outside the model; batches are right-padded
  `LongTensor[B, T]` with an `attention_mask` of 1 on real tokens;
- a training sequence is `encode_prompt(prompt) + encode_text(completion) + [eos_id]`;
  only completion tokens (and the eos) are ever trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Protocol, runtime_checkable

import torch

from thinkling.errors import ThinklingError


def config_from_mapping(cls, section, name: str):
    """The config dataclass `cls` from a recipe's mapping at `model config '<name>'`, unknown keys
    refused by name (the sub-sections of a model config: a tiny VLM's `vision`, `tinyalign`)."""
    if not isinstance(section, dict):
        raise ThinklingError(f"model config '{name}': must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ThinklingError(f"model config '{name}': unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return cls(**section)


# (next-token logits [B, V], completion ids generated so far [B, t]) -> new logits [B, V].
# Rows are the sequences still being generated; `t` is the same for every row
# (rows that already stopped are not passed). Used for temperature-scaled
# stopping and budget forcing, which need the history.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EarlyStop:
    """Stop sampling a group of rows as soon as none of its rows can still succeed.

    For samples that are thrown away unless one of their group succeeds (BREAD's probes):
    finishing such a group buys nothing. `lost(prompt index, ids so far, finished)` must be
    True only when that row can no longer succeed; the sampler asks it when a row finishes
    and when a live row's previous token is one of `check_after` (line ends), and stops every
    row of a group once all are lost (their samples then end where they were stopped).
    """

    groups: tuple[int, ...]  # the group of each prompt
    lost: Callable[[int, list[int], bool], bool]
    check_after: frozenset[int]


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    logits_processor: LogitsProcessor | None = None
    seed: int | None = None  # with a seed, sampling is reproducible (see `keys`); None uses torch's global RNG
    # The random stream of prompt i is (seed, keys[i]) (default keys: 0, 1, 2, ...): a prompt's
    # completion depends on its key, not on which other prompts share the batch or on the batch size.
    keys: tuple[int, ...] | None = None
    early_stop: EarlyStop | None = None  # backends without it sample every row to its end

    def validate(self) -> None:
        """One clear error for bad values, before any backend touches torch."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ThinklingError(f"sampling 'max_new_tokens': must be an integer >= 0 (got {self.max_new_tokens!r})")
        if self.temperature < 0:
            raise ThinklingError(f"sampling 'temperature': must be >= 0 (got {self.temperature!r})")
        if not 0 < self.top_p <= 1:
            raise ThinklingError(f"sampling 'top_p': must be in (0, 1] (got {self.top_p!r})")

    def row_keys(self, n: int) -> list[int]:
        """The stream key of each of `n` prompts."""
        if self.keys is None:
            return list(range(n))
        if len(self.keys) != n:
            raise ThinklingError(f"sampling 'keys': {len(self.keys)} keys for {n} prompts")
        return list(self.keys)


@dataclass
class Sample:
    """One sampled completion: its token ids (ending with eos if emitted) and the sampler's
    log-probability of each, under the distribution it drew from (temperature, top-p and
    logits processor applied). `logprobs` is None when the backend cannot report them."""

    ids: list[int]
    logprobs: list[float] | None = None


@runtime_checkable
class Policy(Protocol):
    """A trainable language model with its tokenizer."""

    model: torch.nn.Module  # parameters the optimizer trains
    eos_id: int
    pad_id: int
    context_length: int | None  # the most tokens a sequence may hold (None: unknown)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids that condition generation (BOS / chat template included). A vision-language
        policy sets `accepts_images = True` and takes `encode_prompt(prompt, images=(...))`,
        writing each image into the ids as slot ids (`models.images`)."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids of raw continuation text (no special tokens)."""

    def decode(self, ids: list[int]) -> str:
        """Text of completion ids, special tokens dropped."""

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_from: int = 0) -> torch.Tensor:
        """Next-token logits of positions `keep_from..T-1`, `[B, T - keep_from, V]`, for a right-padded batch."""

    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One completion per prompt, with the sampler's per-token log-probs when it has them."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """One completion per prompt: generated ids, ending with eos_id if it was emitted."""

    def save(self, directory: str) -> None:
        """Write weights + config + tokenizer so `load_policy(directory)` restores it."""


def pad(rows: list[list], value, *, left: bool = False, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`rows` of different lengths as one `[B, max_len]` tensor, filled with `value` on the right
    (or on the left: generation keeps every row's last token in the same column)."""
    width = max((len(r) for r in rows), default=0)
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([f + list(r) if left else list(r) + f for r, f in zip(rows, fill)], dtype=dtype)


def pad_batch(seqs: list[list[int]], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[B, T]` and the attention mask `[B, T]` (1 on real tokens) of `seqs` padded on one side."""
    return pad(seqs, pad_id, left=left), pad([[1] * len(s) for s in seqs], 0, left=left)
