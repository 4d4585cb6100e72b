"""Supervised fine-tuning on (prompt, completion) pairs with loss on completion tokens only."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinkling.data.curriculum import Uniform
from thinkling.errors import ThinklingError
from thinkling.models.base import pad, pad_batch
from thinkling.models.logprobs import masked_token_logprobs
from thinkling.rollout.prompts import prompt_ids
from thinkling.train.common import (
    clip_gradients,
    lr_at,
    make_optimizer,
    peak_rss_gb,
    set_lr,
    step_generator,
    stop_if_not_finite,
    weights_changed,
)
from thinkling.train.sharding import full_state, gathered, idle_pass, matched_passes


@dataclass
class Example:
    """One training sequence; `weights[t]` > 0 marks token t as a target (0 = context)."""

    ids: list[int]
    weights: list[float]


def make_example(policy, prompt: list[int], completion: str, token_weights: list[float] | None = None) -> Example:
    """prompt ids + completion ids + eos; targets are the completion and the eos."""
    comp = policy.encode_text(completion) + [policy.eos_id]
    w = list(token_weights) + [1.0] if token_weights is not None else [1.0] * len(comp)
    if len(w) != len(comp):
        raise ValueError("token_weights must have one weight per completion token")
    return Example(prompt + comp, [0.0] * len(prompt) + w)


def collate(examples: list[Example], pad_id: int):
    """Right-pad a batch: input ids, attention mask, per-token target weights."""
    ids, mask = pad_batch([e.ids for e in examples], pad_id)
    return ids, mask, pad([e.weights for e in examples], 0.0, dtype=torch.float32)


def weighted_ce(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t w_t·CE_t / Σ_t w_t over next-token targets; weight 0 (prompt, padding) means no loss.

    `denominator` replaces this batch's Σ w: data-parallel shards divide by the
    whole batch's weight, so their losses add up to the full-batch mean.
    """
    targets = ids[:, 1:]
    w = weights[:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    ce = ce.view_as(targets)
    total = w.sum().clamp_min(1e-8) if denominator is None else denominator
    return (torch.where(w > 0, ce, 0.0) * w).sum() / total


def sft_loss(policy, ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
             denominator: torch.Tensor | None = None) -> torch.Tensor:
    """`weighted_ce` of the policy's logits for a collated batch, computed only at target positions
    and without materialising `[B, T, V]` logits (`models.logprobs.masked_token_logprobs`)."""
    w = weights[:, 1:].float()
    logp, _ = masked_token_logprobs(policy, ids, mask, w > 0)
    total = w.sum().clamp_min(1e-8) if denominator is None else denominator
    return (-logp * w).sum() / total


def sft_examples(policy, task, problems) -> list[Example]:
    return [make_example(policy, prompt_ids(policy, p), task.target(p)) for p in problems]


def check_examples_fit(policy, examples: list[Example], problems) -> list[Example]:
    """Every training sequence fits the model's context, or one error naming the first that does not."""
    limit = getattr(policy, "context_length", None)
    for e, p in zip(examples, problems):
        if limit is not None and len(e.ids) > limit:
            raise ThinklingError(f"train problem {p.id}: prompt + target are {len(e.ids)} tokens, longer than the "
                                 f"model's context of {limit}")
    return examples


def train_sft(policy, examples: list[Example], cfg, *, seed: int, run=None, start_step: int = 0,
              optimizer=None, evaluate=None, eval_every: int = 0, progress=None, data_parallel=None,
              sampler=None) -> dict:
    """Train for `cfg.steps` steps (continuing from `start_step`).

    Batches are drawn from a per-step random stream, so step N sees the same
    batch with or without an interruption before it; together with the saved
    optimizer state this makes resume exact.

    With a `data_parallel` world of several processes (`train.distributed`),
    each process trains on its shard of that batch and gradients are summed, so
    the step equals the single-process one; only process 0 evaluates.
    `evaluate(step) -> metrics` runs every `eval_every` steps before the last and is logged to `run`.
    `sampler` (data.curriculum: uniform, the default, or ordered; stateless) picks each batch.
    """
    if not examples:
        raise ThinklingError("SFT: the training set is empty")
    model = policy.model
    model.train()
    optimizer = optimizer or make_optimizer(model, cfg.lr, cfg.weight_decay)
    dp = data_parallel if data_parallel is not None and data_parallel.enabled else None
    if dp is not None:
        dp.broadcast_parameters(model)
    device = next(model.parameters()).device
    sampler = sampler or Uniform(len(examples))
    last = {}
    t0 = time.time()
    tokens = 0
    for step in range(start_step, cfg.steps):
        g = step_generator(seed, step)
        idx = sampler.pick(cfg.batch_size, step, g)
        if dp is not None:
            idx = dp.shard(idx)
        batch = [examples[i] for i in idx]
        lr = lr_at(step, base_lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        # The loss is divided by the whole batch's target weight (every shard's, data-parallel), so
        # micro-batches and shards add up to the full-batch mean.
        counts = torch.tensor([sum(sum(e.weights[1:]) for e in batch), sum(len(e.ids) for e in batch)],
                              dtype=torch.float32)
        if dp is not None:
            counts = dp.sum(counts.to(device)).cpu()
        denominator = counts[0].clamp_min(1e-8)
        optimizer.zero_grad(set_to_none=True)
        part_loss = torch.zeros(())
        size = cfg.micro_batch_size or len(batch)
        if size < len(batch):  # similar lengths share a micro-batch: less padding
            batch = sorted(batch, key=lambda e: len(e.ids))
        starts = range(0, len(batch), size)
        for _ in range(matched_passes(dp, model, len(starts)) if dp is not None else 0):
            idle_pass(policy)  # sharded: as many passes as the process with the most micro-batches
        for start in starts:
            ids, mask, weights = (t.to(device) for t in collate(batch[start : start + size], policy.pad_id))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                micro = sft_loss(policy, ids, mask, weights, denominator=denominator.to(device))
            micro.backward()
            part_loss += micro.detach().float().cpu()
        loss = part_loss if dp is None else dp.sum(part_loss.to(device)).cpu()  # the full-batch mean
        if dp is not None:
            dp.sum_gradients(model)
        grad_norm = clip_gradients(model, cfg.grad_clip)
        stop_if_not_finite(step + 1, loss=loss, grad_norm=grad_norm)
        optimizer.step()
        weights_changed(policy)
        tokens += int(counts[1])
        done = step + 1
        if progress is not None:
            progress(done, loss.item())
        if run is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            last = {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens / max(1e-9, time.time() - t0), "mem/peak_rss_gb": peak_rss_gb()}
            run.log(done, last)
        if evaluate is not None and eval_every and (done % eval_every == 0) and done != cfg.steps:
            model.eval()
            with gathered(policy):  # every process gathers a sharded model's weights; process 0 evaluates
                metrics = evaluate(done) if dp is None or dp.is_main else {}
            if run is not None:
                run.log(done, metrics)
            model.train()
        if run is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            with full_state(policy, optimizer):  # every process: a sharded model's state is gathered
                run.save_checkpoint(done, policy, optimizer, {})
    model.eval()
    return last
