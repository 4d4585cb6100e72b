"""The RL loop: sample groups -> (BREAD branch) -> rewards -> advantages -> clipped policy loss.

One loop serves GRPO, Dr.GRPO, DAPO, CLGRPO, BREAD and TLDR: they differ only
in the knobs `resolve_knobs` fills from the preset and the recipe. `train_rl`
is the whole loop (step, log, samples, evaluation, checkpoints); `RLTrainer`
holds one step's work (collect, update).

Data-parallel (`train.distributed`): each process samples its share of every
step's prompts and sums what the step normalises by over processes (loss
denominators, kept groups, metric sums, gradients), so N processes take the
step one process takes on the whole batch (docs/scale.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from thinkling.algorithms import (
    RL_KNOBS,
    Knobs,
    agg_count,
    compute_advantages,
    group_has_signal,
    policy_loss,
    rl_knobs,
)
from thinkling.data.curriculum import Uniform
from thinkling.errors import ThinklingError
from thinkling.models.base import SamplingParams, pad, pad_batch
from thinkling.models.logprobs import masked_token_logprobs, shared_prefix_logprobs
from thinkling.models.vllm_server import ServedRollouts
from thinkling.progress import console
from thinkling.rewards import RewardSpec, compute_rewards
from thinkling.rollout.bread import anchor_failed_groups
from thinkling.rollout.groups import Group, sample_groups
from thinkling.rollout.prompts import anchor_text, sample_levels
from thinkling.train.common import (
    adam_step_norm,
    clip_gradients,
    lr_at,
    make_optimizer,
    peak_rss_gb,
    run_steps,
    set_lr,
    step_generator,
    stop_if_not_finite,
    weight_norm,
    weights_changed,
)
from thinkling.train.distributed import DataParallel
from thinkling.train.sharding import (
    full_state,
    gathered,
    idle_pass,
    matched_passes,
    maybe_gathered,
)


def resolve_knobs(rl_cfg) -> Knobs:
    """The preset named by `rl.algorithm`, with every explicitly set key overriding it."""
    return rl_knobs(rl_cfg.algorithm, {k: getattr(rl_cfg, k) for k in RL_KNOBS})


def validate_rl(cfg, train_problems, warn: bool = True) -> Knobs:
    """What `RLConfig.validate` cannot check alone: the algorithm's knobs, the reward spec, and
    whether BREAD has expert traces to anchor on. Returns the knobs; `warn` prints a warning
    for settings that are valid but probably not meant (see `warn_inert_clip`)."""
    rl = cfg.rl
    if rl.rollout_backend == "vllm-server" and cfg.model.fsdp and cfg.model.lora:
        raise ThinklingError("config key 'rl.rollout_backend': vllm-server with model.fsdp and model.lora is not "
                             "supported (merging sharded adapters for the server is not implemented)")
    if rl.bread.enabled and not any(p.steps for p in train_problems):
        raise ThinklingError(f"config key 'rl.bread.enabled': task '{cfg.train.name}' has no expert traces to anchor on")
    knobs = resolve_knobs(rl)
    RewardSpec.from_dict(rl.rewards)
    if warn:
        warn_inert_clip(rl, knobs)
    return knobs


def warn_inert_clip(rl, knobs: Knobs) -> bool:
    """Print a warning when asymmetric clipping (clgrpo's clip-low, dapo's clip-higher) cannot act.

    Why: with one PPO epoch and one mini-batch π_old is the current policy, the ratio is exactly 1
    and no ε ever clips, so the run is plain GRPO whatever ε_low / ε_high say. Not an error: such a
    run is valid, just probably not what the recipe meant. Returns whether it warned.
    """
    if knobs.eps_low == knobs.eps_high or rl.ppo_epochs > 1 or rl.minibatches > 1:
        return False
    console.print(f"[yellow]warning:[/] rl.algorithm '{rl.algorithm}' clips asymmetrically "
                  f"(eps_low={knobs.eps_low}, eps_high={knobs.eps_high}), but with rl.ppo_epochs=1 and "
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
    sampler_logp: torch.Tensor | None = None  # [B, T-1]: the sampler's log-probs (None: not recorded)
    prefix_len: torch.Tensor | None = None  # [B]: tokens of context (prompt + BREAD anchor) before the completion


def build_batch(groups: list[Group], advantages: torch.Tensor, pad_id: int) -> Batch:
    """Sequences are prefix + completion; only completion tokens enter the loss (prefix and
    BREAD anchors are context), so they receive exactly zero gradient."""
    seqs, masks, advs, logps, prefix = [], [], [], [], []
    for gi, g in enumerate(groups):
        for ci, c in enumerate(g.completions):
            seqs.append(g.prefix + c.ids)
            prefix.append(len(g.prefix))
            masks.append([0] * len(g.prefix) + [1] * len(c.ids))
            advs.append(float(advantages[gi, ci]))
            logps.append(None if c.logprobs is None else [0.0] * len(g.prefix) + list(c.logprobs))
    ids, attn = pad_batch(seqs, pad_id)
    loss_mask = pad(masks, 0.0, dtype=torch.float32)
    sampler = None if any(lp is None for lp in logps) else pad(logps, 0.0, dtype=torch.float32)[:, 1:]
    return Batch(ids, attn, loss_mask[:, 1:], torch.tensor(advs), sampler, torch.tensor(prefix))


class RLTrainer:
    """Holds the policy, the frozen reference and the optimizer.

    `reference` is the policy the run started from (frozen): the KL anchor when β > 0, and
    what `kl_mean` (KL(π‖π_start) on each step's samples) is measured against when
    `rl.kl_to_start` is on. Without one (β = 0, kl_to_start off) no reference is run.
    """

    def __init__(self, policy, task, problems, cfg, knobs: Knobs, optimizer, *, seed: int, reference=None,
                 data_parallel: DataParallel | None = None, sampler=None, rollout_client=None):
        self.policy, self.task, self.problems, self.cfg, self.knobs = policy, task, problems, cfg, knobs
        self.sampler = sampler or Uniform(len(problems))  # which problems a step draws (data.curriculum)
        self.optimizer = optimizer
        self.seed = seed
        self.dp = data_parallel or DataParallel()
        # rl.rollout_backend vllm-server: a generation server samples, the policy here only trains.
        self.client = rollout_client
        self.rollouts = policy if rollout_client is None else ServedRollouts(policy, rollout_client)
        self.weight_syncs = 0
        self.reward_spec = RewardSpec.from_dict(cfg.rewards)
        if knobs.beta > 0 and reference is None:
            raise ThinklingError("rl.beta > 0 needs the reference policy (the run's starting policy)")
        self.ref = reference
        if reference is not None:
            reference.model.requires_grad_(False)
            reference.model.eval()
        self.anchor_memory: dict = {}
        self.totals = {"generated_tokens": 0, "anchor_tokens": 0, "anchor_trace_tokens": 0, "samples": 0}

    # ------------------------------------------------------------------ rollouts
    def _params(self, step: int, round_: int) -> SamplingParams:
        c = self.cfg
        return SamplingParams(c.max_new_tokens, c.temperature, c.top_p, None, seed=(self.seed * 7919 + step) * 1009 + round_)

    def collect(self, step: int) -> tuple[list[Group], dict]:
        """This process's groups of the step (each with its `position` in the whole step's batch)
        and the step's rollout stats, summed over processes.

        Every round's prompts are drawn for the whole step from (seed, step); process r samples
        requests r, r+N, ... of the round, keyed by the request's place in the round, so a group's
        completions and BREAD probes are the same for any number of processes. After each round
        the kept groups are counted over processes: the refill decision, and the order of groups
        in the batch (round, then request), are those of one process.
        """
        with maybe_gathered(self.policy, self.client is None):  # a sharded policy generates with its full weights
            return self._collect(step)

    def _collect(self, step: int) -> tuple[list[Group], dict]:
        c, dp = self.cfg, self.dp
        g = step_generator(self.seed, step)
        stats = dict.fromkeys(("groups_sampled", "groups_dropped_equal", "bread/anchored", "bread/failed_groups",
                               "bread/probe_groups", "bread/dropped_unsolved", "bread/dropped_no_trace",
                               "bread/probe_tokens", "generated_tokens"), 0)
        probe_rounds = 0
        kept: list[Group] = []
        n_kept = 0  # over all processes
        for round_ in range(1 + (c.resample_rounds if self.knobs.dynamic_sampling else 0)):
            need = c.prompts_per_step - n_kept
            if need <= 0:
                break
            idx = self.sampler.pick(need, step, g)
            levels = (sample_levels(need, int(torch.randint(2**31, (1,), generator=g)), self.reward_spec.length.levels)
                      if self.reward_spec.length is not None else [None] * need)
            keys = list(range(dp.rank, need, dp.world_size))  # this process's requests
            requests = [(self.problems[idx[i]], levels[i], 0) for i in keys]
            groups = (sample_groups(self.rollouts, self.task, requests, c.group_size, self._params(step, 100 * round_),
                                    keys=keys) if requests else [])
            self._observe(idx, groups)
            stats["groups_sampled"] += len(groups)
            stats["generated_tokens"] += sum(x.tokens for grp in groups for x in grp.completions)
            if c.bread.enabled:
                failed = [grp for grp in groups if not grp.has_success]
                branched, bstats = anchor_failed_groups(
                    self.rollouts, self.task, failed, c.group_size,
                    lambda r, rr=round_: self._params(step, 100 * rr + 1 + r), c.bread.max_probes,
                    self.anchor_memory if c.bread.remember_anchors else None, c.bread.early_stop)
                if c.bread.remember_anchors:
                    self._share_anchors(branched)
                stats["bread/failed_groups"] += len(failed)
                stats["bread/anchored"] += len(branched)
                for k in ("bread/probe_groups", "bread/dropped_unsolved", "bread/dropped_no_trace"):
                    stats[k] += bstats[k]
                stats["generated_tokens"] += bstats["generated_tokens"]  # all probes, including failed ones
                stats["bread/probe_tokens"] += bstats["generated_tokens"]
                # Probes run in lock-step: one process searching every group needs the most rounds any needed.
                probe_rounds += int(dp.max(torch.tensor(bstats["bread/probe_rounds"])))
                groups = sorted([grp for grp in groups if grp.has_success] + branched, key=lambda grp: grp.key)
            for grp in groups:
                grp.rewards = self._rewards(grp)
            if self.knobs.dynamic_sampling:
                signal = group_has_signal(torch.tensor([grp.rewards for grp in groups])) if groups else []
                stats["groups_dropped_equal"] += sum(1 for s in signal if not s)
                groups = [grp for grp, s in zip(groups, signal) if s]
            was_kept = torch.zeros(need)
            was_kept[[grp.key for grp in groups]] = 1.0
            dp.sum(was_kept)
            place = n_kept + was_kept.cumsum(0).long() - 1
            for grp in groups:
                grp.position = int(place[grp.key])
            n_kept += int(was_kept.sum())
            kept += groups
        stats = {k: int(v) for k, v in dp.reduce(stats).items()}
        if c.bread.enabled:
            stats["bread/probe_rounds"] = probe_rounds
        stats.update(self.sampler.stats())
        return kept, stats

    def _observe(self, idx: list[int], groups: list[Group]) -> None:
        """Show the curriculum sampler every group's outcome of the round, in request order, on
        every process (each sampled only its share): their samplers stay identical. Samplers that
        do not learn from outcomes skip it (no exchange between processes every round)."""
        if not self.sampler.learns_from_outcomes:
            return
        mine = [(grp.key, idx[grp.key], sum(x.correct for x in grp.completions), len(grp.completions))
                for grp in groups]
        outcomes = sorted(x for part in self.dp.gather(mine) for x in part)
        self.sampler.observe([(i, right, size) for _, i, right, size in outcomes])

    def _share_anchors(self, branched: list[Group]) -> None:
        """Tell every process the anchors the others found (`rl.bread.remember_anchors`): the problem
        may go to another process next time. Applied in request order, as one process would."""
        if not self.dp.enabled:
            return
        found = sorted(x for part in self.dp.gather([(grp.key, grp.problem.id, grp.anchor_steps) for grp in branched])
                       for x in part)
        for _, problem_id, anchor in found:
            self.anchor_memory[problem_id] = anchor

    def _rewards(self, grp: Group) -> list[float]:
        comps = grp.completions
        r, _ = compute_rewards(self.reward_spec, [x.correct for x in comps], [x.format_ok for x in comps],
                               [x.tokens for x in comps], [grp.level] * len(comps))
        return r.tolist()

    # ------------------------------------------------------------------- update
    def update(self, groups: list[Group], step: int, total_steps: int) -> dict:
        """One PPO update on the step's groups (this process's share; gradients summed over processes).

        Minibatches are cut from the rows of the whole step's batch (row = group position × G +
        completion), so each process trains the rows of a minibatch it holds, possibly none."""
        c, k, dp = self.cfg, self.knobs, self.dp
        rewards = torch.tensor([grp.rewards for grp in groups], dtype=torch.float32).reshape(-1, c.group_size)
        stop_if_not_finite(step + 1, reward=rewards.sum())
        adv = compute_advantages(k.advantage, rewards)
        batch = build_batch(groups, adv, self.policy.pad_id) if groups else None
        counts = dp.reduce({"groups": len(groups), "groups_with_signal": int(group_has_signal(rewards).sum()),
                            "rows": adv.numel(), "adv_abs": float(adv.abs().sum()), "adv_nonzero": int((adv != 0).sum()),
                            **advantage_token_counts(batch)})
        signal = {"groups_with_signal": counts["groups_with_signal"] / max(1.0, counts["groups"])}
        if not counts["adv_nonzero"] and k.beta == 0 and k.entropy_coef == 0:
            # No learning signal: the gradient is exactly zero, but an optimizer step would still
            # move the weights along Adam's momentum. Skip it.
            return {"skipped_update": 1, "advantage_abs_mean": 0.0, **signal}
        release = getattr(self.policy, "release_generation_memory", None)
        if release is not None:  # the update changes the weights: the engine's copy would be rebuilt anyway
            release()
        model = self.policy.model
        device = next(model.parameters()).device
        n = int(counts["rows"])
        local = {grp.position * c.group_size + i: row
                 for row, (grp, i) in enumerate((grp, i) for grp in groups for i in range(c.group_size))}
        reuse_old = c.ppo_epochs == 1 and c.minibatches == 1  # π_old == π_θ exactly: ratio is 1
        old_logp = ref_logp = None
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.bf16)
        with torch.no_grad(), autocast, gathered(self.policy):
            if not reuse_old and batch is not None:
                old_logp = self._logp(self.policy, batch, slice(None), device)
            if self.ref is not None and batch is not None:
                ref_logp = self._logp(self.ref, batch, slice(None), device)
        lr = lr_at(step, base_lr=c.lr, warmup=c.warmup_steps, total=total_steps, min_ratio=1.0)
        set_lr(self.optimizer, lr)
        model.train()
        stats_acc: dict[str, float] = {}
        updates, step_norm = 0, 0.0
        mb = max(1, -(-n // c.minibatches))
        for epoch in range(c.ppo_epochs):
            order = torch.randperm(n, generator=step_generator(self.seed + 17 + epoch, step)) if c.minibatches > 1 else torch.arange(n)
            for start in range(0, n, mb):
                rows = torch.tensor([local[r] for r in order[start : start + mb].tolist() if r in local], dtype=torch.long)
                self.optimizer.zero_grad(set_to_none=True)
                loss, stats = self._accumulate(batch, rows, old_logp, ref_logp, autocast)
                dp.sum_gradients(model)
                grad_norm = clip_gradients(model, c.grad_clip)
                stop_if_not_finite(step + 1, loss=loss, grad_norm=grad_norm)
                self.optimizer.step()
                updates += 1
                step_norm += adam_step_norm(self.optimizer)
                for key, v in {**stats, "loss": loss.item(), "grad_norm": float(grad_norm)}.items():
                    stats_acc[key] = stats_acc.get(key, 0.0) + float(v)
        model.eval()
        weights_changed(self.policy)
        out = {key: v / max(1, updates) for key, v in stats_acc.items()}
        if self.client is not None:
            t_sync = time.time()
            self.sync_server()
            out["time/weight_sync_s"] = time.time() - t_sync
        norm = weight_norm(model)
        tokens = max(counts["tokens"], 1.0)
        out.update(signal, lr=lr, advantage_abs_mean=counts["adv_abs"] / max(1.0, counts["rows"]),
                   **{"tokens/adv_pos_frac": counts["tokens_pos"] / tokens, "tokens/adv_neg_frac": counts["tokens_neg"] / tokens},
                   update_norm_rel=step_norm / max(norm, 1e-12), weight_norm=norm)
        return out

    def _accumulate(self, batch: Batch | None, rows: torch.Tensor, old_logp, ref_logp,
                    autocast) -> tuple[torch.Tensor, dict]:
        """Gradients of one minibatch's loss, `rl.micro_batch_size` rows per forward/backward pass.

        Each micro-batch's loss is divided by the whole minibatch's normaliser (counted over all
        processes), so the accumulated gradients of all processes sum to the minibatch's; its stats
        (token means; `*_max` stats: maxima) are weighted by loss tokens over all processes.
        Rows are grouped by length, so each micro-batch is padded only to its own longest row.
        Returns the minibatch's loss (detached, summed over processes) and stats.
        """
        c, k = self.cfg, self.knobs
        device = next(self.policy.model.parameters()).device
        count = agg_count(batch.loss_mask[rows], k.aggregation) if len(rows) else torch.zeros((), dtype=torch.long)
        denominator = self.dp.sum(count.to(device)).clamp(min=1)
        size = c.micro_batch_size or max(1, len(rows))
        if size < len(rows) and c.share_prompt:  # a group's rows together (they share a prefix), short prompts first
            rows = rows[torch.argsort(batch.prefix_len[rows] * (len(batch.ids) + 1) + rows)]
        elif size < len(rows):  # shortest first: similar lengths share a micro-batch
            rows = rows[torch.argsort(batch.attention_mask[rows].sum(dim=1), stable=True)]
        total, sums, maxes, tokens = torch.zeros(()), {}, {}, 0.0
        starts = range(0, len(rows), size)
        for _ in range(matched_passes(self.dp, self.policy.model, len(starts))):
            idle_pass(self.policy)  # sharded: as many passes as the process with the most micro-batches
        for start in starts:
            part = rows[start : start + size]
            with autocast:
                loss, stats, _ = minibatch_loss(self.policy, batch, part, k, max_len=c.max_new_tokens,
                                                temperature=c.temperature, tis_cap=c.tis_cap,
                                                share_prompt=c.share_prompt,
                                                old_logp=None if old_logp is None else old_logp[part],
                                                ref_logp=None if ref_logp is None else ref_logp[part],
                                                denominator=denominator)
            loss.backward()
            total += loss.detach().float().cpu()
            n_tok = float(batch.loss_mask[part].sum())
            tokens += n_tok
            for key, v in stats.items():
                if key.endswith("_max"):
                    maxes[key] = max(maxes.get(key, float("-inf")), float(v))
                else:
                    sums[key] = sums.get(key, 0.0) + float(v) * n_tok
        reduced = self.dp.reduce({**sums, "_loss": float(total), "_tokens": tokens}, maxes)
        loss, tokens = torch.tensor(reduced.pop("_loss")), max(reduced.pop("_tokens"), 1.0)
        return loss, {key: v if key.endswith("_max") else v / tokens for key, v in reduced.items()}

    def _logp(self, policy, batch: Batch, rows, device) -> torch.Tensor:
        """Log-probs of the sampled tokens (0 elsewhere) under `policy` (π_old or the reference),
        of the distribution the sampler drew from (logits / temperature)."""
        ids, attn, mask = batch.ids[rows].to(device), batch.attention_mask[rows].to(device), batch.loss_mask[rows]
        if self.cfg.share_prompt and batch.prefix_len is not None:
            return shared_prefix_logprobs(policy, ids, attn, mask, batch.prefix_len[rows],
                                          temperature=self.cfg.temperature)[0]
        return masked_token_logprobs(policy, ids, attn, mask, temperature=self.cfg.temperature)[0]

    def sync_server(self) -> None:
        """Send the policy's weights (LoRA merged; a sharded policy's gathered) to the generation
        server, from process 0; every process waits until it has them."""
        if self.client is None:
            return
        with full_state(self.policy):
            if self.dp.is_main:
                plain = getattr(self.policy, "plain_state_dict", None)
                self.client.sync_weights(plain() if plain is not None else self.policy.model.state_dict())
        self.dp.barrier()
        self.weight_syncs += 1

    # --------------------------------------------------------------------- step
    def step(self, step: int, total_steps: int) -> tuple[dict, list[Group]]:
        """Collect and update; returns the step's metrics (over all processes; the `time/` ones are
        this process's: generate and update without communication, then communication) and this
        process's groups."""
        dp = self.dp
        t0, comm0 = time.time(), dp.comm_seconds()
        groups, stats = self.collect(step)
        levels = self.reward_spec.length.levels if self.reward_spec.length is not None else ()
        sums = dp.reduce({**rollout_sums(groups, levels), **self._expert_tokens(groups)},
                         {"completion_len_max": max((x.tokens for grp in groups for x in grp.completions), default=0)})
        comm1 = dp.comm_seconds()
        metrics = {**stats, "time/generate_s": time.time() - t0 - (comm1 - comm0)}
        if sums["completions"]:
            metrics.update(rollout_metrics(sums, levels))
            for key in ("trace_tokens_all", "anchor_tokens", "anchor_trace_tokens"):
                self.totals[key] = self.totals.get(key, 0) + int(sums[f"expert/{key}"])
            t1 = time.time()
            metrics.update(self.update(groups, step, total_steps))
            metrics["time/update_s"] = time.time() - t1 - (dp.comm_seconds() - comm1)
        else:
            metrics["skipped_update"] = 1  # every group dropped
        self.totals["generated_tokens"] += stats["generated_tokens"]
        self.totals["samples"] += int(sums["completions"])
        metrics["total/generated_tokens"] = self.totals["generated_tokens"]
        if self.cfg.bread.enabled and self.totals.get("trace_tokens_all"):
            metrics["bread/expert_token_fraction"] = self.totals["anchor_tokens"] / self.totals["trace_tokens_all"]
            metrics["bread/expert_token_fraction_anchored"] = (
                self.totals["anchor_tokens"] / max(1, self.totals["anchor_trace_tokens"]))
        metrics["time/comm_s"] = dp.comm_seconds() - comm0
        metrics["time/step_s"] = time.time() - t0
        metrics["mem/peak_rss_gb"] = peak_rss_gb()
        return metrics, groups

    def _expert_tokens(self, groups: list[Group]) -> dict:
        """Expert tokens BREAD showed the model, against two denominators: the full traces of the
        anchored problems, and the full traces of every problem trained on (what SFT would use)."""
        out = {"expert/trace_tokens_all": 0, "expert/anchor_tokens": 0, "expert/anchor_trace_tokens": 0}
        for grp in groups:
            full = len(self.policy.encode_text(anchor_text(grp.problem, len(grp.problem.steps))))
            out["expert/trace_tokens_all"] += full
            if grp.anchor_steps > 0:
                out["expert/anchor_tokens"] += grp.anchor_tokens
                out["expert/anchor_trace_tokens"] += full
        return out

    def state(self) -> dict:
        return {"anchor_memory": self.anchor_memory, "totals": self.totals, "sampler": self.sampler.state()}

    def load_state(self, state: dict) -> None:
        self.anchor_memory = dict(state.get("anchor_memory", {}))
        self.sampler.load_state(state.get("sampler", {}))
        self.totals.update(state.get("totals", {}))


def train_rl(policy, task, problems, cfg, knobs: Knobs, *, seed: int, run=None, start_step: int = 0,
             optimizer=None, state: dict | None = None, evaluate=None, eval_every: int = 0,
             progress=None, reference=None, data_parallel: DataParallel | None = None, sampler=None,
             rollout_client=None) -> RLTrainer:
    """Train for `cfg.steps` RL steps (continuing from `start_step`), mirroring `train_sft`.

    Every step logs its metrics to `run`; every `cfg.samples_every` steps a few groups go to
    `run`'s samples; `evaluate(step) -> metrics` runs at step 0 of a fresh run and every
    `eval_every` steps before the last (the caller evaluates the final policy); a checkpoint
    (policy, optimizer, trainer state) is written every `cfg.save_every` steps and at the end.
    Step N's prompts and samples depend only on (seed, N), so a resumed run repeats exactly
    what an uninterrupted one does. `reference` is the run's starting policy (see `RLTrainer`);
    `sampler` (data.curriculum, default uniform) chooses each step's problems, its state checkpointed.
    With a `data_parallel` world of several processes, every process runs this loop on its share
    of each step and only process 0 evaluates (its `run` is the only one that writes).
    `rollout_client` (`models.vllm_server.ServerClient`): a generation server samples the rollouts
    and gets the weights before the first step and after every update.
    Returns the trainer (its `totals` count generated tokens).
    """
    dp = data_parallel or DataParallel()
    dp.broadcast_parameters(policy.model)
    optimizer = optimizer or make_optimizer(policy.model, cfg.lr, cfg.weight_decay)
    trainer = RLTrainer(policy, task, problems, cfg, knobs, optimizer, seed=seed, reference=reference,
                        data_parallel=dp, sampler=sampler, rollout_client=rollout_client)
    if state:
        trainer.load_state(state)
    trainer.sync_server()  # the server may hold other weights (a resumed run's checkpoint, LoRA init)
    policy.model.eval()

    def evaluate_now(step: int) -> None:
        with gathered(policy):  # every process gathers a sharded policy's weights; process 0 evaluates
            if not dp.is_main:
                return
            metrics = evaluate(step)
        if run is not None:
            run.log(step, {**metrics, "total/generated_tokens": trainer.totals["generated_tokens"]})

    last: list[Group] = []  # the step's groups, for the samples

    def take_step(step: int) -> dict:
        metrics, groups = trainer.step(step, cfg.steps)
        last[:] = groups
        return metrics

    def samples() -> list[dict]:
        return [{"id": g.problem.id, "anchor_steps": g.anchor_steps, "reward": r, "correct": c.correct,
                 "completion": c.text} for g in last[:4] for c, r in zip(g.completions, g.rewards)]

    def save(done: int) -> None:
        with full_state(policy, optimizer):  # every process: a sharded policy's state is gathered
            run.save_checkpoint(done, policy, optimizer, trainer.state())

    run_steps(cfg, take_step, run=run, start_step=start_step, evaluate=evaluate_now if evaluate is not None else None,
              eval_every=eval_every, progress=progress, samples=samples, save=save)
    return trainer


def rollout_sums(groups: list[Group], levels: tuple[str, ...] = ()) -> dict:
    """The sums the step's rollout metrics are means of (`rollout_metrics`). Sums, not means, so
    that data-parallel processes can add theirs up and log the whole batch's means."""
    comps = [(grp, c, r) for grp in groups for c, r in zip(grp.completions, grp.rewards or [0.0] * len(grp.completions))]
    anchored = [grp for grp in groups if grp.anchor_steps > 0]
    out = {"completions": len(comps), "reward": sum(r for _, _, r in comps), "reward_sq": sum(r * r for _, _, r in comps),
           "correct": sum(c.correct for _, c, _ in comps), "format_ok": sum(c.format_ok for _, c, _ in comps),
           "tokens": sum(c.tokens for _, c, _ in comps), "anchored_groups": len(anchored),
           "anchor_steps": sum(grp.anchor_steps for grp in anchored),
           "anchor_tokens": sum(grp.anchor_tokens for grp in anchored)}
    for level in levels:
        of_level = [c for grp, c, _ in comps if grp.level == level]
        out[f"tldr/{level}/n"] = len(of_level)
        out[f"tldr/{level}/tokens"] = sum(c.tokens for c in of_level)
        out[f"tldr/{level}/correct"] = sum(c.correct for c in of_level)
    return out


def rollout_metrics(sums: dict, levels: tuple[str, ...] = ()) -> dict:
    """Reward, accuracy, format and length means of the step's completions from `rollout_sums`
    (`completion_len_max` passed through when present), TLDR's per-level means (`level_metrics`)
    and BREAD's anchor means over anchored groups. Empty for a step without completions."""
    n = sums["completions"]
    if not n:
        return {}
    mean = sums["reward"] / n
    out = {"reward_mean": mean, "reward_std": max(0.0, sums["reward_sq"] / n - mean * mean) ** 0.5,
           "accuracy": sums["correct"] / n, "format_rate": sums["format_ok"] / n,
           "completion_len_mean": sums["tokens"] / n}
    if "completion_len_max" in sums:
        out["completion_len_max"] = int(sums["completion_len_max"])
    for level in levels:
        if sums[f"tldr/{level}/n"]:
            out[f"tldr/{level}/completion_len_mean"] = sums[f"tldr/{level}/tokens"] / sums[f"tldr/{level}/n"]
            out[f"tldr/{level}/accuracy"] = sums[f"tldr/{level}/correct"] / sums[f"tldr/{level}/n"]
    if sums["anchored_groups"]:
        out["bread/anchor_steps_mean"] = sums["anchor_steps"] / sums["anchored_groups"]
        out["bread/anchor_tokens_mean"] = sums["anchor_tokens"] / sums["anchored_groups"]
    return out


def level_metrics(groups: list[Group], levels: tuple[str, ...]) -> dict:
    """TLDR per length level L: `tldr/<L>/completion_len_mean` and `tldr/<L>/accuracy`.

    Why: TLDR works only if the levels separate (short prompts get short completions); the
    step-wide means mix the levels and cannot show it. Means over this step's completions whose
    group had level L; a level no prompt drew this step gets no keys.
    """
    return {k: v for k, v in rollout_metrics(rollout_sums(groups, levels), levels).items() if k.startswith("tldr/")}


def minibatch_loss(policy, batch: Batch, rows, knobs: Knobs, *, max_len: int, old_logp=None, ref_logp=None,
                   temperature: float = 1.0, tis_cap: float | None = None, denominator=None,
                   share_prompt: bool = False):
    """The clipped policy loss of some rows of a batch; returns (loss, stats, logp), `logp [B, T-1]`
    the log-probs of the sampled tokens (0 at positions outside the loss mask, never computed).

    `old_logp=None` means π_old is the current policy (μ = 1): the ratio is exactly 1.
    `temperature` is the one the rollouts were sampled at: the policy being trained is
    softmax(logits / T), so its log-probs (and entropy) come from the scaled logits.
    When the batch has the sampler's log-probs, the stats measure how far the sampler
    (bf16 weights, vLLM) is from π_old, and `tis_cap` turns on truncated importance
    sampling: each token's loss is weighted by min(π_old / π_sampler, tis_cap).
    `denominator`: the loss normaliser of a larger batch these rows are a micro-batch of
    (`agg_denominator`). Columns past the rows' longest sequence are dropped (right padding
    never changes a causal model's outputs at real positions). `share_prompt`: rows with the same
    prefix (`batch.prefix_len`) run it once (`shared_prefix_logprobs`; same numbers, less work).
    """
    device = next(policy.model.parameters()).device
    attn = batch.attention_mask[rows]
    width = max(2, int(attn.sum(dim=1).max()))
    ids, attn = batch.ids[rows][:, :width].to(device), attn[:, :width].to(device)
    mask = batch.loss_mask[rows][:, : width - 1].to(device)

    def cut(x):
        return None if x is None else x[rows][:, : width - 1].to(device)

    if share_prompt and batch.prefix_len is not None:
        logp, entropy = shared_prefix_logprobs(policy, ids, attn, mask, batch.prefix_len[rows],
                                               entropy=knobs.entropy_coef != 0, temperature=temperature)
    else:
        logp, entropy = masked_token_logprobs(policy, ids, attn, mask, entropy=knobs.entropy_coef != 0,
                                              temperature=temperature)
    old = logp.detach() if old_logp is None else old_logp[:, : width - 1].to(device)
    weights, stats = None, {"entropy_estimate": -_token_mean(old, mask)}
    if batch.sampler_logp is not None:
        weights, offpolicy = sampler_correction(old, cut(batch.sampler_logp), mask, tis_cap)
        stats.update(offpolicy)
    loss, loss_stats = policy_loss(
        logp, old, batch.advantages[rows].to(device), mask, eps_low=knobs.eps_low, eps_high=knobs.eps_high,
        aggregation=knobs.aggregation, loss=knobs.loss,
        ref_logp=None if ref_logp is None else ref_logp[:, : width - 1].to(device),
        beta=knobs.beta, kl_estimator=knobs.kl_estimator, entropy=entropy, entropy_coef=knobs.entropy_coef,
        max_len=max_len, token_weights=weights, denominator=denominator)
    return loss, {**stats, **loss_stats}, logp


def sampler_correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       cap: float | None) -> tuple[torch.Tensor | None, dict]:
    """How far the sampler is from π_old on the sampled tokens, and the truncated importance weights.

    Rollouts from bf16 weights or another engine (vLLM) are drawn from π_sampler, not π_old;
    training on them as if on-policy biases the gradient. The weights min(π_old / π_sampler, cap)
    (None without a cap) correct for it (truncated IS, as in verl's TIS). Stats: `offpolicy/kl`
    (mean log π_sampler − log π_old, a k1 estimate of KL(π_sampler‖π_old)), `offpolicy/ratio_max`
    and, with a cap, `offpolicy/truncated_frac` (share of tokens whose weight hit it).
    """
    on = mask != 0
    log_ratio = torch.where(on, old_logp - sampler_logp, 0.0)
    ratio = log_ratio.exp()
    stats = {"offpolicy/kl": -_token_mean(log_ratio, on),
             "offpolicy/ratio_max": float(ratio[on].max()) if bool(on.any()) else 1.0}
    if cap is None:
        return None, stats
    stats["offpolicy/truncated_frac"] = _token_mean((ratio > cap).float(), on)
    return ratio.clamp(max=cap).detach(), stats


def advantage_token_counts(batch: Batch | None) -> dict:
    """Trained tokens, and those with positive / negative advantage: how much of an update pushes
    up and how much pushes down (with a rare success, most tokens are pushed down). Counts, so
    that processes can add theirs up."""
    if batch is None:
        return {"tokens": 0, "tokens_pos": 0, "tokens_neg": 0}
    on = batch.loss_mask != 0
    sign = batch.advantages[:, None].expand_as(on)
    return {"tokens": int(on.sum()), "tokens_pos": int((on & (sign > 0)).sum()), "tokens_neg": int((on & (sign < 0)).sum())}


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    on = mask != 0
    return float(torch.where(on, x.detach(), 0.0).sum() / on.sum().clamp(min=1))
