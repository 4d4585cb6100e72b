"""Supervised fine-tuning on (prompt, completion) pairs with loss on completion tokens only."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thinkling.data.curriculum import Uniform
from thinkling.errors import ThinklingError
from thinkling.models.base import pad, pad_batch
from thinkling.models.logprobs import masked_token_logprobs
from thinkling.rollout.prompts import prompt_ids, prompt_text
from thinkling.tasks.templates import WEIGHTED_KINDS, spans_text
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
    """One training sequence; `weights[t]` > 0 marks token t as a target (0 = context).

    `template[t]` = 1 marks a solution-template token (a plan or step-boundary token, SST): its
    weight is multiplied by the template weight of the step (`weights_at`), which may anneal."""

    ids: list[int]
    weights: list[float]
    template: list[float] | None = None

    def weights_at(self, template_weight: float = 1.0) -> list[float]:
        if self.template is None or template_weight == 1.0:
            return self.weights
        return [w * (template_weight if m else 1.0) for w, m in zip(self.weights, self.template)]


def make_example(policy, prompt: list[int], completion: str, token_weights: list[float] | None = None,
                 template: list[float] | None = None) -> Example:
    """prompt ids + completion ids + eos; targets are the completion and the eos, each weighted by
    `token_weights` (default 1); `template` marks the completion tokens a template weight scales."""
    comp = policy.encode_text(completion) + [policy.eos_id]
    w = list(token_weights) + [1.0] if token_weights is not None else [1.0] * len(comp)
    if len(w) != len(comp) or (template is not None and len(template) + 1 != len(comp)):
        raise ValueError("token_weights / template must have one value per completion token")
    mask = [0.0] * len(prompt) + list(template) + [0.0] if template is not None else None
    return Example(prompt + comp, [0.0] * len(prompt) + w, mask)


def token_char_ends(policy, text: str, ids: list[int]) -> list[int]:
    """Where in `text` each of its tokens `ids` ends: the tokenizer's offsets when it has them
    (Hugging Face fast tokenizers), else by decoding token by token (exact for the character
    tokenizer), else by decoding growing prefixes."""
    tok = getattr(policy, "tokenizer", None)
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            return [end for _, end in enc["offset_mapping"]]
    pieces = [policy.decode([i]) for i in ids]
    if "".join(pieces) == text:
        ends, pos = [], 0
        for piece in pieces:
            pos += len(piece)
            ends.append(pos)
        return ends
    return [len(policy.decode(ids[: i + 1])) for i in range(len(ids))]


def span_weights(policy, spans) -> tuple[str, list[float], list[float]]:
    """The completion text of typed spans (`tasks.templates`), each token's weight (0 on an injected
    wrong result, else 1) and its template mark (1 on plan and step-boundary tokens). A token that
    straddles spans takes the strictest: any error char -> 0, else any template char -> template."""
    text = spans_text(spans)
    kinds = [s.kind for s in spans for _ in s.text]
    ids = policy.encode_text(text)
    weights, template, start = [], [], 0
    for end in token_char_ends(policy, text, ids):
        covered = set(kinds[start:max(end, start + 1)]) if start < len(kinds) else set()
        weights.append(0.0 if "error" in covered else 1.0)
        template.append(1.0 if covered & set(WEIGHTED_KINDS) and "error" not in covered else 0.0)
        start = max(start, end)
    return text, weights, template


def template_weight_at(step: int, cfg) -> float:
    """The template weight of a step: `sft.template_weight`, constant or annealed (linear / cosine)
    to 1.0 at the last step — the plan is stressed early, the whole trace counts alike at the end."""
    w = cfg.template_weight
    if cfg.template_weight_anneal == "none":
        return w
    frac = min(1.0, step / max(1, cfg.steps - 1))
    keep = 1 - frac if cfg.template_weight_anneal == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0 + (w - 1.0) * keep


def collate(examples: list[Example], pad_id: int, template_weight: float = 1.0):
    """Right-pad a batch: input ids, attention mask, per-token target weights."""
    ids, mask = pad_batch([e.ids for e in examples], pad_id)
    return ids, mask, pad([e.weights_at(template_weight) for e in examples], 0.0, dtype=torch.float32)


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
    """One example per problem; its token weights come from the task's typed target spans."""
    examples = []
    for p in problems:
        spans = task.target_spans(p)
        if all(s.kind == "text" for s in spans):  # a plain trace: no per-token weights to work out
            examples.append(make_example(policy, prompt_ids(policy, p), spans_text(spans)))
            continue
        text, weights, template = span_weights(policy, spans)
        examples.append(make_example(policy, prompt_ids(policy, p), text, weights,
                                     template if any(template) else None))
    return examples


def build_memory(policy, task, problems) -> bool:
    """A TinyAlign policy's memory bank (`models.tinyalign`) from the training pairs, before any
    prompt is encoded (retrieval happens when it is): built automatically when a run starts, so
    the bank always holds exactly the data the run trains on. Other policies: nothing to do."""
    build = getattr(policy, "build_memory", None)
    if build is None:
        return False
    return build([(p.images, prompt_text(p), spans_text(task.target_spans(p))) for p in problems])


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
        tw = template_weight_at(step, cfg)
        # The loss is divided by the whole batch's target weight (every shard's, data-parallel), so
        # micro-batches and shards add up to the full-batch mean.
        counts = torch.tensor([sum(sum(e.weights_at(tw)[1:]) for e in batch), sum(len(e.ids) for e in batch)],
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
            ids, mask, weights = (t.to(device) for t in collate(batch[start : start + size], policy.pad_id, tw))
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
            if cfg.template_weight != 1.0:
                last["template_weight"] = tw
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
