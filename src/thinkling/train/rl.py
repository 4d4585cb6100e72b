"""The RL loop: sample groups -> (BREAD branch) -> rewards -> advantages -> clipped policy loss.

One loop serves GRPO, Dr.GRPO, DAPO, CLGRPO, BREAD and TLDR: they differ only
in the knobs `resolve_knobs` fills from the preset and the recipe.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from thinkling.algorithms import RL_KNOBS, agg_denominator, compute_advantages, group_has_signal, policy_loss, rl_knobs
from thinkling.errors import ThinklingError
from thinkling.models.base import SamplingParams
from thinkling.models.logprobs import masked_token_logprobs
from thinkling.progress import console
from thinkling.rewards import RewardSpec, compute_rewards, sample_levels
from thinkling.rollout.bread import anchor_failed_groups
from thinkling.rollout.groups import Group, sample_groups
from thinkling.train.common import lr_at, peak_rss_gb, set_lr, step_generator, weights_changed

def resolve_knobs(rl_cfg) -> dict:
    """The preset named by `rl.algorithm`, with every explicitly set key overriding it."""
    return rl_knobs(rl_cfg.algorithm, {k: getattr(rl_cfg, k) for k in RL_KNOBS})


def validate_rl(cfg, train_problems) -> dict:
    rl = cfg.rl
    if rl.group_size < 2:
        raise ThinklingError(f"config key 'rl.group_size' must be >= 2 (group-relative advantages need a group), got {rl.group_size}")
    for key in ("steps", "prompts_per_step", "ppo_epochs", "minibatches", "max_new_tokens", "save_every", "log_every"):
        if getattr(rl, key) < 1:
            raise ThinklingError(f"config key 'rl.{key}' must be >= 1, got {getattr(rl, key)}")
    if rl.micro_batch_size is not None and rl.micro_batch_size < 1:
        raise ThinklingError(f"config key 'rl.micro_batch_size' must be >= 1, got {rl.micro_batch_size}")
    if rl.lr <= 0:
        raise ThinklingError(f"config key 'rl.lr' must be > 0, got {rl.lr}")
    if rl.bread.enabled and not any(p.steps for p in train_problems):
        raise ThinklingError(f"config key 'rl.bread.enabled': task '{cfg.train.name}' has no expert traces to anchor on")
    if rl.bread.max_probes is not None and rl.bread.max_probes < 1:
        raise ThinklingError("config key 'rl.bread.max_probes' must be >= 1")
    knobs = resolve_knobs(rl)
    RewardSpec.from_dict(rl.rewards)
    warn_inert_clip(rl, knobs)
    return knobs


def warn_inert_clip(rl, knobs: dict) -> bool:
    """Print a warning when asymmetric clipping (clgrpo's clip-low, dapo's clip-higher) cannot act.

    Why: with one PPO epoch and one mini-batch π_old is the current policy, the ratio is exactly 1
    and no ε ever clips, so the run is plain GRPO whatever ε_low / ε_high say. Not an error: such a
    run is valid, just probably not what the recipe meant. Returns whether it warned.
    """
    if knobs["eps_low"] == knobs["eps_high"] or rl.ppo_epochs > 1 or rl.minibatches > 1:
        return False
    console.print(f"[yellow]warning:[/] rl.algorithm '{rl.algorithm}' clips asymmetrically "
                  f"(eps_low={knobs['eps_low']}, eps_high={knobs['eps_high']}), but with rl.ppo_epochs=1 and "
                  "rl.minibatches=1 the ratio is exactly 1 and the clip never acts; "
                  "set rl.ppo_epochs=2 or rl.minibatches=2 to make it matter")
    return True


@dataclass
class Batch:
    """Right-padded training tensors for a list of groups; mask marks the sampled tokens."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor  # [B, T-1], aligned with next-token log-probs
    advantages: torch.Tensor  # [B]


def build_batch(groups: list[Group], advantages: torch.Tensor, pad_id: int) -> Batch:
    """Sequences are prefix + completion; only completion tokens enter the loss (prefix and
    BREAD anchors are context), so they receive exactly zero gradient."""
    seqs, masks, advs = [], [], []
    for gi, g in enumerate(groups):
        for ci, c in enumerate(g.completions):
            seqs.append(g.prefix + c.ids)
            masks.append([0] * len(g.prefix) + [1] * len(c.ids))
            advs.append(float(advantages[gi, ci]))
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        loss_mask[i, : len(s)] = torch.tensor(m, dtype=torch.float32)
    return Batch(ids, attn, loss_mask[:, 1:], torch.tensor(advs))


class RLTrainer:
    """Holds the policy, the frozen reference (only when β > 0) and the optimizer."""

    def __init__(self, policy, task, problems, cfg, knobs: dict, optimizer, *, seed: int):
        self.policy, self.task, self.problems, self.cfg, self.knobs = policy, task, problems, cfg, knobs
        self.optimizer = optimizer
        self.seed = seed
        self.reward_spec = RewardSpec.from_dict(cfg.rewards)
        self.ref = None
        if knobs["beta"] > 0:  # β = 0 never builds a reference model
            self.ref = copy.deepcopy(policy)
            self.ref.model.requires_grad_(False)
            self.ref.model.eval()
        self.anchor_memory: dict = {}
        self.totals = {"generated_tokens": 0, "anchor_tokens": 0, "anchor_trace_tokens": 0, "samples": 0}

    # ------------------------------------------------------------------ rollouts
    def _params(self, step: int, round_: int) -> SamplingParams:
        c = self.cfg
        return SamplingParams(c.max_new_tokens, c.temperature, c.top_p, None, seed=(self.seed * 7919 + step) * 1009 + round_)

    def collect(self, step: int) -> tuple[list[Group], dict]:
        c = self.cfg
        g = step_generator(self.seed, step)
        stats = {"groups_sampled": 0, "groups_dropped_equal": 0, "bread/anchored": 0, "bread/failed_groups": 0,
                 "bread/probe_groups": 0, "bread/dropped_unsolved": 0, "bread/dropped_no_trace": 0}
        kept: list[Group] = []
        generated = 0
        for round_ in range(1 + (c.resample_rounds if self.knobs["dynamic_sampling"] else 0)):
            need = c.prompts_per_step - len(kept)
            if need <= 0:
                break
            idx = torch.randint(len(self.problems), (need,), generator=g).tolist()
            levels = (sample_levels(need, int(torch.randint(2**31, (1,), generator=g)), self.reward_spec.length.levels)
                      if self.reward_spec.length is not None else [None] * need)
            requests = [(self.problems[i], lv, 0) for i, lv in zip(idx, levels)]
            groups = sample_groups(self.policy, self.task, requests, c.group_size, self._params(step, 100 * round_))
            stats["groups_sampled"] += len(groups)
            generated += sum(x.tokens for grp in groups for x in grp.completions)
            if c.bread.enabled:
                failed = [grp for grp in groups if not grp.has_success]
                groups = [grp for grp in groups if grp.has_success]
                branched, bstats = anchor_failed_groups(
                    self.policy, self.task, failed, c.group_size,
                    lambda r, rr=round_: self._params(step, 100 * rr + 1 + r), c.bread.max_probes,
                    self.anchor_memory if c.bread.remember_anchors else None)
                stats["bread/failed_groups"] += len(failed)
                stats["bread/anchored"] += len(branched)
                for k in ("bread/probe_groups", "bread/probe_rounds", "bread/dropped_unsolved", "bread/dropped_no_trace"):
                    stats[k] = stats.get(k, 0) + bstats[k]
                generated += bstats["generated_tokens"]  # all probes, including failed ones
                groups += branched
            for grp in groups:
                grp.rewards = self._rewards(grp)
            if self.knobs["dynamic_sampling"]:
                signal = group_has_signal(torch.tensor([grp.rewards for grp in groups])) if groups else []
                stats["groups_dropped_equal"] += sum(1 for s in signal if not s)
                groups = [grp for grp, s in zip(groups, signal) if s]
            kept += groups
        stats["generated_tokens"] = generated
        return kept[: c.prompts_per_step] if self.knobs["dynamic_sampling"] else kept, stats

    def _rewards(self, grp: Group) -> list[float]:
        comps = grp.completions
        r, _ = compute_rewards(self.reward_spec, [x.correct for x in comps], [x.format_ok for x in comps],
                               [x.tokens for x in comps], [grp.level] * len(comps))
        return r.tolist()

    # ------------------------------------------------------------------- update
    def update(self, groups: list[Group], step: int, total_steps: int) -> dict:
        c, k = self.cfg, self.knobs
        rewards = torch.tensor([grp.rewards for grp in groups])
        adv = compute_advantages(k["advantage"], rewards)
        if not adv.any() and k["beta"] == 0 and k["entropy_coef"] == 0:
            # No learning signal: the gradient is exactly zero, but an optimizer step would still
            # move the weights along Adam's momentum. Skip it.
            return {"skipped_update": 1, "advantage_abs_mean": 0.0}
        batch = build_batch(groups, adv, self.policy.pad_id)
        release = getattr(self.policy, "release_generation_memory", None)
        if release is not None:  # the update changes the weights: the engine's copy would be rebuilt anyway
            release()
        model = self.policy.model
        device = next(model.parameters()).device
        n = batch.ids.shape[0]
        reuse_old = c.ppo_epochs == 1 and c.minibatches == 1  # π_old == π_θ exactly: ratio is 1
        old_logp = ref_logp = None
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.bf16)
        with torch.no_grad(), autocast:
            if not reuse_old:
                old_logp = self._logp(self.policy, batch, slice(None), device)
            if self.ref is not None:
                ref_logp = self._logp(self.ref, batch, slice(None), device)
        lr = lr_at(step, base_lr=c.lr, warmup=c.warmup_steps, total=total_steps, min_ratio=1.0)
        set_lr(self.optimizer, lr)
        model.train()
        stats_acc: dict[str, float] = {}
        updates = 0
        mb = max(1, -(-n // c.minibatches))
        for epoch in range(c.ppo_epochs):
            order = torch.randperm(n, generator=step_generator(self.seed + 17 + epoch, step)) if c.minibatches > 1 else torch.arange(n)
            for start in range(0, n, mb):
                rows = order[start : start + mb]
                self.optimizer.zero_grad(set_to_none=True)
                loss, stats = self._accumulate(batch, rows, old_logp, ref_logp, autocast)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
                self.optimizer.step()
                updates += 1
                for key, v in {**stats, "loss": loss.item(), "grad_norm": float(grad_norm)}.items():
                    stats_acc[key] = stats_acc.get(key, 0.0) + float(v)
        model.eval()
        weights_changed(self.policy)
        out = {key: v / max(1, updates) for key, v in stats_acc.items()}
        out["lr"] = lr
        out["advantage_abs_mean"] = adv.abs().mean().item()
        return out

    def _accumulate(self, batch: Batch, rows: torch.Tensor, old_logp, ref_logp, autocast) -> tuple[torch.Tensor, dict]:
        """Gradients of one minibatch's loss, `rl.micro_batch_size` rows per forward/backward pass.

        Each micro-batch's loss is divided by the whole minibatch's normaliser, so the
        accumulated gradient is the minibatch's; its stats (token means) are weighted by its
        loss tokens. Rows are grouped by length, so each micro-batch is padded only to its own
        longest row. Returns the minibatch's loss (detached) and stats.
        """
        c, k = self.cfg, self.knobs
        size = c.micro_batch_size or len(rows)
        mask = batch.loss_mask[rows]
        denominator = agg_denominator(mask, k["aggregation"])
        if size < len(rows):  # shortest first: similar lengths share a micro-batch
            rows = rows[torch.argsort(batch.attention_mask[rows].sum(dim=1), stable=True)]
        total, stats_sum, tokens = torch.zeros(()), {}, 0.0
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            with autocast:
                loss, stats, _ = minibatch_loss(self.policy, batch, part, k, max_len=c.max_new_tokens,
                                                old_logp=None if old_logp is None else old_logp[part],
                                                ref_logp=None if ref_logp is None else ref_logp[part],
                                                denominator=denominator)
            loss.backward()
            total += loss.detach().float().cpu()
            n_tok = float(batch.loss_mask[part].sum())
            tokens += n_tok
            for key, v in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(v) * n_tok
        return total, {key: v / max(tokens, 1.0) for key, v in stats_sum.items()}

    def _logp(self, policy, batch: Batch, rows, device) -> torch.Tensor:
        """Log-probs of the sampled tokens (0 elsewhere) under `policy`: π_old or the reference."""
        return masked_token_logprobs(policy, batch.ids[rows].to(device), batch.attention_mask[rows].to(device),
                                     batch.loss_mask[rows])[0]

    # --------------------------------------------------------------------- step
    def step(self, step: int, total_steps: int) -> tuple[dict, list[Group]]:
        t0 = time.time()
        groups, stats = self.collect(step)
        t_gen = time.time() - t0
        metrics = {**stats, "time/generate_s": t_gen}
        all_c = [x for grp in groups for x in grp.completions]
        if all_c:
            rewards = torch.tensor([r for grp in groups for r in grp.rewards])
            metrics.update({
                "reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
                "accuracy": sum(x.correct for x in all_c) / len(all_c),
                "format_rate": sum(x.format_ok for x in all_c) / len(all_c),
                "completion_len_mean": sum(x.tokens for x in all_c) / len(all_c),
                "completion_len_max": max(x.tokens for x in all_c),
            })
            if self.reward_spec.length is not None:
                metrics.update(level_metrics(groups, self.reward_spec.length.levels))
            anchored = [grp for grp in groups if grp.anchor_steps > 0]
            if anchored:
                metrics["bread/anchor_steps_mean"] = sum(g.anchor_steps for g in anchored) / len(anchored)
                metrics["bread/anchor_tokens_mean"] = sum(g.anchor_tokens for g in anchored) / len(anchored)
            self._count_expert_tokens(groups)
            t1 = time.time()
            metrics.update(self.update(groups, step, total_steps))
            metrics["time/update_s"] = time.time() - t1
        else:
            metrics["skipped_update"] = 1  # every group dropped
        self.totals["generated_tokens"] += stats["generated_tokens"]
        self.totals["samples"] += len(all_c)
        metrics["total/generated_tokens"] = self.totals["generated_tokens"]
        if self.cfg.bread.enabled and self.totals.get("trace_tokens_all"):
            metrics["bread/expert_token_fraction"] = self.totals["anchor_tokens"] / self.totals["trace_tokens_all"]
            metrics["bread/expert_token_fraction_anchored"] = (
                self.totals["anchor_tokens"] / max(1, self.totals["anchor_trace_tokens"]))
        metrics["time/step_s"] = time.time() - t0
        metrics["mem/peak_rss_gb"] = peak_rss_gb()
        return metrics, groups

    def _count_expert_tokens(self, groups: list[Group]) -> None:
        """Expert tokens BREAD showed the model, against two denominators: the full traces of the
        anchored problems, and the full traces of every problem trained on (what SFT would use)."""
        from thinkling.rollout.prompts import anchor_text

        for grp in groups:
            full = len(self.policy.encode_text(anchor_text(grp.problem, len(grp.problem.steps))))
            self.totals["trace_tokens_all"] = self.totals.get("trace_tokens_all", 0) + full
            if grp.anchor_steps > 0:
                self.totals["anchor_tokens"] += grp.anchor_tokens
                self.totals["anchor_trace_tokens"] += full

    def state(self) -> dict:
        return {"anchor_memory": self.anchor_memory, "totals": self.totals}

    def load_state(self, state: dict) -> None:
        self.anchor_memory = dict(state.get("anchor_memory", {}))
        self.totals.update(state.get("totals", {}))


def level_metrics(groups: list[Group], levels: tuple[str, ...]) -> dict:
    """TLDR per length level L: `tldr/<L>/completion_len_mean` and `tldr/<L>/accuracy`.

    Why: TLDR works only if the levels separate (short prompts get short completions); the
    step-wide means mix the levels and cannot show it. Means over this step's completions whose
    group had level L; a level no prompt drew this step gets no keys.
    """
    out = {}
    for level in levels:
        comps = [c for grp in groups if grp.level == level for c in grp.completions]
        if comps:
            out[f"tldr/{level}/completion_len_mean"] = sum(c.tokens for c in comps) / len(comps)
            out[f"tldr/{level}/accuracy"] = sum(c.correct for c in comps) / len(comps)
    return out


def minibatch_loss(policy, batch: Batch, rows, knobs: dict, *, max_len: int, old_logp=None, ref_logp=None,
                   denominator=None):
    """The clipped policy loss of some rows of a batch; returns (loss, stats, logp), `logp [B, T-1]`
    the log-probs of the sampled tokens (0 at positions outside the loss mask, never computed).

    `old_logp=None` means π_old is the current policy (μ = 1): the ratio is exactly 1.
    `denominator`: the loss normaliser of a larger batch these rows are a micro-batch of
    (`agg_denominator`). Columns past the rows' longest sequence are dropped (right padding
    never changes a causal model's outputs at real positions).
    """
    device = next(policy.model.parameters()).device
    attn = batch.attention_mask[rows]
    width = max(2, int(attn.sum(dim=1).max()))
    ids, attn = batch.ids[rows][:, :width].to(device), attn[:, :width].to(device)
    mask = batch.loss_mask[rows][:, : width - 1].to(device)
    cut = lambda x: None if x is None else x[:, : width - 1].to(device)  # noqa: E731
    logp, entropy = masked_token_logprobs(policy, ids, attn, mask, entropy=knobs["entropy_coef"] > 0)
    loss, stats = policy_loss(
        logp, logp.detach() if old_logp is None else cut(old_logp), batch.advantages[rows].to(device),
        mask, eps_low=knobs["eps_low"], eps_high=knobs["eps_high"],
        aggregation=knobs["aggregation"], ref_logp=cut(ref_logp),
        beta=knobs["beta"], kl_estimator=knobs["kl_estimator"], entropy=entropy,
        entropy_coef=knobs["entropy_coef"], max_len=max_len, denominator=denominator)
    return loss, stats, logp
