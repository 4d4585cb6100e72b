"""Per-token log-probabilities of given sequences, for any policy backend."""

from __future__ import annotations

import torch

from thinkling.models.base import Policy


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] `[B, T]` in float32.

    Gathers the target logit and subtracts a logsumexp instead of building a
    full `[B, T, V]` log-softmax: one float32 copy of the logits at most.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1 of a right-padded batch, `[B, T-1]`; 0 where x_t is padding."""
    logits = policy.logits(input_ids, attention_mask)[:, :-1]
    targets = input_ids[:, 1:].to(logits.device)
    logprobs = token_logprobs(logits, targets)
    return logprobs.masked_fill(attention_mask[:, 1:].to(logits.device) == 0, 0.0)
