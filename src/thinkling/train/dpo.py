"""Rollout DPO: DPO on (correct, incorrect) pairs of the policy's own rollouts.

Every `refresh_every` steps a round samples G completions for each of a batch of prompts from
the current policy, the task's verifier splits them into right and wrong, and each prompt with
both gives up to `pairs_per_prompt` preference pairs (`rollout.pairs`). The frozen reference
(the starting policy) scores each pair once, when it is made; the steps of the round then take
DPO steps on the pairs. `refresh_every: 1` is online DPO (fresh pairs from the current policy
every step, as GRPO samples fresh groups); larger values are iterative DPO (several steps on
one round's pairs). Unlike GRPO, only prompts whose group is mixed teach anything, and a pair
pushes its two completions apart relative to the reference instead of weighting every sample
by its advantage.

Step N's prompts, samples and batch depend only on (seed, N) and the round's pairs are
checkpointed, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
import time

import torch

from thinkling.algorithms import PREFERENCE_LOSSES, dpo_loss
from thinkling.data.curriculum import Uniform
from thinkling.errors import ThinklingError
from thinkling.models.base import SamplingParams, pad, pad_batch
from thinkling.models.logprobs import masked_token_logprobs
from thinkling.rollout.groups import sample_groups
from thinkling.rollout.pairs import Pair, preference_pairs
from thinkling.train.common import (
    clip_gradients,
    lr_at,
    make_optimizer,
    peak_rss_gb,
    run_steps,
    set_lr,
    step_generator,
    stop_if_not_finite,
    weights_changed,
)


def validate_dpo(dpo_cfg) -> None:
    """What `DPOConfig.validate` leaves to the loss's owner: the loss name."""
    if dpo_cfg.loss not in PREFERENCE_LOSSES:
        raise ThinklingError(f"config key 'dpo.loss': must be {' or '.join(PREFERENCE_LOSSES)}, got {dpo_cfg.loss!r}")


def rounds(cfg) -> int:
    """How many rollout rounds a run of `cfg.steps` steps samples."""
    return math.ceil(cfg.steps / cfg.refresh_every)


def completion_logprobs(policy, pairs: list[Pair], *, mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(chosen | prompt) and log π(rejected | prompt) `[P]` of each pair: sums of the completion
    tokens' log-probs (means with `mean`, IPO's length-normalised form). Prompt tokens are context."""
    seqs = [p.prefix + side for p in pairs for side in (p.chosen, p.rejected)]
    masks = [[0] * len(p.prefix) + [1] * len(side) for p in pairs for side in (p.chosen, p.rejected)]
    device = next(policy.model.parameters()).device
    ids, attn = pad_batch(seqs, policy.pad_id)
    mask = pad(masks, 0, dtype=torch.float32)[:, 1:].to(device)
    width = max(2, int(attn.sum(dim=1).max()))
    logp, _ = masked_token_logprobs(policy, ids[:, :width].to(device), attn[:, :width].to(device), mask[:, : width - 1])
    per_seq = logp.sum(dim=-1)
    if mean:
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1)
    return per_seq[0::2], per_seq[1::2]


class DPOTrainer:
    """Holds the policy, the frozen reference, the optimizer and the current round's pairs."""

    def __init__(self, policy, reference, task, problems, cfg, optimizer, *, seed: int, sampler=None):
        if reference is None:
            raise ThinklingError("DPO needs the reference policy (the run's starting policy)")
        self.policy, self.ref, self.task, self.problems, self.cfg = policy, reference, task, problems, cfg
        self.optimizer, self.seed = optimizer, seed
        self.sampler = sampler or Uniform(len(problems))
        reference.model.requires_grad_(False)
        reference.model.eval()
        self.pairs: list[Pair] = []
        self.totals = {"generated_tokens": 0, "samples": 0, "pairs": 0}

    # ----------------------------------------------------------------- pairs
    def make_pairs(self, round_: int) -> dict:
        """Sample the round's groups from the current policy, keep (correct, incorrect) pairs and
        score them under the reference. Returns the round's rollout stats."""
        c = self.cfg
        g = step_generator(self.seed, round_)
        idx = self.sampler.pick(c.prompts_per_round, round_, g)
        params = SamplingParams(c.max_new_tokens, c.temperature, c.top_p, None, seed=(self.seed * 7919 + round_) * 1009)
        groups = sample_groups(self.policy, self.task, [(self.problems[i], None, 0) for i in idx], c.group_size, params)
        if self.sampler.learns_from_outcomes:
            self.sampler.observe([(i, sum(x.correct for x in grp.completions), len(grp.completions))
                                  for i, grp in zip(idx, groups)])
        pairs = preference_pairs(groups, c.pairs_per_prompt, g)
        with torch.no_grad(), torch.autocast(self._device().type, dtype=torch.bfloat16, enabled=c.bf16):
            size = c.micro_batch_size or max(1, len(pairs))
            for start in range(0, len(pairs), size):
                part = pairs[start : start + size]
                chosen, rejected = completion_logprobs(self.ref, part, mean=c.loss == "ipo")
                for p, lc, lr in zip(part, chosen.tolist(), rejected.tolist()):
                    p.ref_chosen, p.ref_rejected = lc, lr
        self.pairs = pairs
        comps = [x for grp in groups for x in grp.completions]
        tokens = sum(x.tokens for x in comps)
        self.totals["generated_tokens"] += tokens
        self.totals["samples"] += len(comps)
        self.totals["pairs"] += len(pairs)
        mixed = sum(1 for grp in groups if 0 < sum(x.correct for x in grp.completions) < len(grp.completions))
        return {"accuracy": sum(x.correct for x in comps) / max(1, len(comps)),
                "format_rate": sum(x.format_ok for x in comps) / max(1, len(comps)),
                "completion_len_mean": tokens / max(1, len(comps)), "groups_sampled": len(groups),
                "groups_with_pair": mixed, "pairs_built": len(pairs), "generated_tokens": tokens,
                **self.sampler.stats()}

    def _device(self) -> torch.device:
        return next(self.policy.model.parameters()).device

    # ---------------------------------------------------------------- update
    def batch(self, step: int) -> list[Pair]:
        """The step's pairs: all of the round's (`batch_size` unset), else `batch_size` of them drawn
        without replacement from (seed, step)."""
        n = self.cfg.batch_size
        if n is None or n >= len(self.pairs):
            return list(self.pairs)
        order = torch.randperm(len(self.pairs), generator=step_generator(self.seed, step)).tolist()
        return [self.pairs[i] for i in order[:n]]

    def update(self, pairs: list[Pair], step: int, total_steps: int) -> dict:
        """One optimizer step on the mean DPO loss of `pairs` (micro-batches accumulate gradients)."""
        c = self.cfg
        if not pairs:  # no prompt had both a right and a wrong completion: nothing to prefer
            return {"skipped_update": 1, "pairs": 0}
        release = getattr(self.policy, "release_generation_memory", None)
        if release is not None:
            release()
        lr = lr_at(step, base_lr=c.lr, warmup=c.warmup_steps, total=total_steps, min_ratio=1.0)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        device = self._device()
        size = c.micro_batch_size or len(pairs)
        total, sums, logps = torch.zeros(()), {}, {"logps/chosen": 0.0, "logps/rejected": 0.0}
        for start in range(0, len(pairs), size):
            part = pairs[start : start + size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.bf16):
                chosen, rejected = completion_logprobs(self.policy, part, mean=c.loss == "ipo")
                loss, stats = dpo_loss(chosen, rejected, torch.tensor([p.ref_chosen for p in part], device=device),
                                       torch.tensor([p.ref_rejected for p in part], device=device), beta=c.beta,
                                       loss=c.loss, label_smoothing=c.label_smoothing, denominator=len(pairs))
            loss.backward()
            total += loss.detach().float().cpu()
            for key, v in stats.items():
                sums[key] = sums.get(key, 0.0) + v * len(part)
            logps["logps/chosen"] += float(chosen.detach().sum())
            logps["logps/rejected"] += float(rejected.detach().sum())
        grad_norm = clip_gradients(self.policy.model, c.grad_clip)
        stop_if_not_finite(step + 1, loss=total, grad_norm=grad_norm)
        self.optimizer.step()
        weights_changed(self.policy)
        return {"loss": float(total), "lr": lr, "grad_norm": float(grad_norm), "pairs": len(pairs),
                **{k: v / len(pairs) for k, v in {**sums, **logps}.items()}}

    def step(self, step: int, total_steps: int) -> dict:
        """A new round's pairs when the step starts one, then the update; the step's metrics."""
        t0 = time.time()
        metrics = {}
        if step % self.cfg.refresh_every == 0:
            metrics.update(self.make_pairs(step // self.cfg.refresh_every))
            metrics["time/generate_s"] = time.time() - t0
        t1 = time.time()
        metrics.update(self.update(self.batch(step), step, total_steps))
        metrics["time/update_s"] = time.time() - t1
        metrics["total/generated_tokens"] = self.totals["generated_tokens"]
        metrics["mem/peak_rss_gb"] = peak_rss_gb()
        return metrics

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """What a resume needs besides weights and optimizer: the round's pairs (made by the policy
        of the round's start, which a mid-round checkpoint no longer is), totals and the sampler."""
        return {"pairs": [vars(p) for p in self.pairs], "totals": self.totals, "sampler": self.sampler.state()}

    def load_state(self, state: dict) -> None:
        self.pairs = [Pair(**p) for p in state.get("pairs", [])]
        self.totals.update(state.get("totals", {}))
        self.sampler.load_state(state.get("sampler", {}))


def train_dpo(policy, reference, task, problems, cfg, *, seed: int, run=None, start_step: int = 0, optimizer=None,
              state: dict | None = None, evaluate=None, eval_every: int = 0, progress=None, sampler=None) -> DPOTrainer:
    """Train for `cfg.steps` DPO steps (continuing from `start_step`), as `train_rl` does for RL: log
    every `cfg.log_every` steps, a few pairs to `run`'s samples every `cfg.samples_every`, evaluate at
    step 0 of a fresh run and every `eval_every` steps before the last (the caller evaluates the final
    policy), checkpoint every `cfg.save_every` steps and at the end. Returns the trainer."""
    optimizer = optimizer or make_optimizer(policy.model, cfg.lr, cfg.weight_decay)
    trainer = DPOTrainer(policy, reference, task, problems, cfg, optimizer, seed=seed, sampler=sampler)
    if state:
        trainer.load_state(state)
    policy.model.eval()

    def evaluate_now(step: int) -> None:
        metrics = evaluate(step)
        if run is not None:
            run.log(step, {**metrics, "total/generated_tokens": trainer.totals["generated_tokens"]})

    def samples() -> list[dict]:
        return [{"id": p.problem_id, "chosen": policy.decode(p.chosen), "rejected": policy.decode(p.rejected)}
                for p in trainer.pairs[:8]]

    run_steps(cfg, lambda step: trainer.step(step, cfg.steps), run=run, start_step=start_step,
              evaluate=evaluate_now if evaluate is not None else None, eval_every=eval_every, progress=progress,
              samples=samples, save=lambda done: run.save_checkpoint(done, policy, optimizer, trainer.state()))
    return trainer
