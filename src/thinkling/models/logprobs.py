"""Per-token log-probabilities of given sequences, for any policy backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from thinkling.models.base import Policy


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] `[B, T]` in float32.

    Gathers the target logit and subtracts a logsumexp instead of building a
    full `[B, T, V]` log-softmax: one float32 copy of the logits at most.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def first_loss_position(loss_mask: torch.Tensor) -> int:
    """The first next-token position any row trains on (`loss_mask` is `[B, T-1]`).

    Logits before it are never used, so the policy need not compute them: the
    output layer over a 49k vocabulary is a large share of an update, and a
    chat-template prompt is often half of each sequence (TRL's `logits_to_keep`).
    """
    hits = loss_mask.any(dim=0).nonzero()
    return int(hits[0]) if len(hits) else 0


def sequence_logprobs(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep_from: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1 of a right-padded batch, `[B, T-1]`; 0 where x_t is padding
    and for t <= `keep_from` (positions the caller does not need, never computed).

    `temperature` scales the logits first: the log-probs of the distribution a sampler at
    that temperature drew from, which is the policy RL optimises."""
    logits = policy.logits(input_ids, attention_mask, keep_from=keep_from)[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, keep_from + 1 :].to(logits.device)
    logprobs = F.pad(token_logprobs(logits, targets), (keep_from, 0))
    return logprobs.masked_fill(attention_mask[:, 1:].to(logits.device) == 0, 0.0)
