"""Per-token log-probabilities of given sequences, for any policy backend.

`masked_token_logprobs` is what the trainers call. For a policy that exposes its
final hidden states and output layer (`HFPolicy.output_head`), it never builds
the `[B, T, V]` logits: the output layer runs on the needed positions only, a
chunk of rows at a time (`head_logprobs`), and its backward recomputes each
chunk's logits instead of keeping them. Over SmolLM2's 49k vocabulary a batch's
float32 logits and their log-softmax / gradient copies were gigabytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from thinkling.models.base import Policy, pad_batch

# Float32 logits held at once by `head_logprobs` (per tensor; forward and backward hold ~3 such tensors).
HEAD_CHUNK_BYTES = 64 * 2**20


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] `[B, T]` in float32.

    Gathers the target logit and subtracts a logsumexp instead of building a
    full `[B, T, V]` log-softmax: one float32 copy of the logits at most.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim; -inf logits (banned tokens) count as p = 0."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # 0·log 0 = 0; masking logp first keeps -inf out of the backward pass as well.
    return -(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1)


def first_loss_position(loss_mask: torch.Tensor) -> int:
    """The first next-token position any row trains on (`loss_mask` is `[B, T-1]`).

    Logits before it are never used, so the policy need not compute them: the
    output layer over a 49k vocabulary is a large share of an update, and a
    chat-template prompt is often half of each sequence (TRL's `logits_to_keep`).
    """
    hits = loss_mask.any(dim=0).nonzero()
    return int(hits[0]) if len(hits) else 0


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] (and the entropy) by chunks of rows.

    Saves only its inputs and one logsumexp per row; the backward recomputes each
    chunk's logits. Under autocast both passes cast to its dtype once and run the
    linear layer's matmuls themselves, as autograd would on the unchunked layer.
    Every chunk reuses the same few logits-sized buffers: allocated afresh per chunk
    (tens of MB each, so mapped and unmapped by the allocator every time), their
    page faults cost a SmolLM2 RL update seconds of system time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, with_entropy: bool):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.dtype, ctx.chunk = dtype, chunk
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32) if with_entropy else None
        with torch.autocast(device, enabled=False):
            logits = _ChunkLogits(hidden, weight, bias, dtype, chunk)
            spare = torch.empty_like(logits.buffer)
            for s, _, z in logits.chunks():
                rows = slice(s, s + len(z))
                logp[rows] = z.gather(1, targets[rows, None]).squeeze(1)
                top = z.amax(dim=-1)  # logsumexp as torch computes it: log Σ exp(z - max) + max
                top = torch.where(top.isinf(), 0.0, top)
                e = torch.sub(z, top[:, None], out=spare[: len(z)]).exp_()
                lse[rows] = e.sum(dim=-1).log_().add_(top)
                logp[rows] -= lse[rows]
                if with_entropy:  # H = -Σ p log p = lse - Σ p z
                    e = torch.sub(z, lse[rows, None], out=spare[: len(z)]).exp_().mul_(z)
                    entropy[rows] = lse[rows] - e.sum(dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.mark_non_differentiable(lse)
        return (logp, entropy) if with_entropy else (logp,)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        w_grad = b_grad = gw = None
        with torch.autocast(hidden.device.type, enabled=False):
            logits = _ChunkLogits(hidden, weight, bias, ctx.dtype, ctx.chunk)
            spare = torch.empty_like(logits.buffer)
            arange = torch.arange(len(logits.buffer), device=hidden.device)
            for s, h, z in logits.chunks():
                rows = slice(s, s + len(z))
                g = grad_logp[rows, None]
                logp = z.sub_(lse[rows, None])
                p = torch.exp(logp, out=spare[: len(z)])
                if grad_entropy is not None:  # dH / dz = -p (log p + H)
                    dh = logp.add_(entropy[rows, None]).mul_(p).mul_(grad_entropy[rows, None])
                grad_z = p.mul_(-g)  # d logp_target / dz = onehot(target) - p
                grad_z[arange[: len(z)], targets[rows]] += g.squeeze(1)
                if grad_entropy is not None:
                    grad_z -= dh
                grad_z = logits.cast(grad_z)
                if need_h:
                    grad_hidden[rows] = grad_z @ logits.weight
                if need_w:
                    gw = torch.mm(grad_z.t(), h, out=gw)
                    w_grad = gw.to(weight.dtype, copy=True) if w_grad is None else w_grad.add_(gw)
                if need_b:
                    gb = grad_z.sum(dim=0).to(bias.dtype)
                    b_grad = gb if b_grad is None else b_grad + gb
        return (grad_hidden, w_grad, b_grad, None, None, None)


class _ChunkLogits:
    """The float32 logits of `hidden`'s rows, `chunk` rows at a time, in one reused buffer. The
    matmul runs in `dtype` (autocast's; else the weight's) on inputs cast once, as `F.linear` would."""

    def __init__(self, hidden, weight, bias, dtype, chunk: int):
        self.dtype = dtype or weight.dtype
        self.hidden = hidden.detach()
        self.weight = weight.detach().to(self.dtype)
        self.bias = None if bias is None else bias.detach().to(self.dtype)
        self.chunk = max(1, min(chunk, hidden.shape[0]))
        shape = (self.chunk, weight.shape[0])
        self.buffer = hidden.new_empty(shape, dtype=torch.float32)
        self._low = self.buffer if self.dtype == torch.float32 else hidden.new_empty(shape, dtype=self.dtype)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (a chunk of logits' shape, float32) in the matmul dtype."""
        return x if self._low is self.buffer else self._low[: len(x)].copy_(x)

    def chunks(self):
        """(first row, the rows' inputs in the matmul dtype, their float32 logits `[rows, V]`) per
        chunk; the logits view is overwritten by the next chunk's."""
        for s in range(0, self.hidden.shape[0], self.chunk):
            h = self.hidden[s : s + self.chunk].to(self.dtype)
            out = self._low[: len(h)]
            if self.bias is None:
                torch.mm(h, self.weight.t(), out=out)
            else:
                torch.addmm(self.bias, h, self.weight.t(), out=out)
            z = self.buffer[: len(h)]
            if self._low is not self.buffer:
                z.copy_(out)
            yield s, h, z


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                  *, entropy: bool = False, chunk_bytes: int | None = None):
    """log softmax(hidden @ weight.T + bias)[targets] `[N]` in float32 (and the entropy of each
    row's distribution when `entropy`), for `hidden [N, D]`, `weight [V, D]`, `targets [N]`,
    holding at most `chunk_bytes` (default `HEAD_CHUNK_BYTES`) of float32 logits per tensor at a time. Differentiable in
    `hidden`, `weight` and `bias`; the same values and gradients as `token_logprobs` of the full
    logits (and `entropy_from_logits`), to float rounding."""
    chunk = max(1, (chunk_bytes or HEAD_CHUNK_BYTES) // (4 * weight.shape[0]))
    out = _HeadLogprobs.apply(hidden, weight, bias, targets, chunk, entropy)
    return (out[0], out[1]) if entropy else (out[0], None)


def masked_token_logprobs(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          mask: torch.Tensor, *, entropy: bool = False, temperature: float = 1.0):
    """log p(x_{t+1} | x_<=t) `[B, T-1]` where `mask [B, T-1]` is set, 0 elsewhere (and the
    entropy of each next-token distribution there, when `entropy`), of softmax(logits / temperature).

    Positions outside the mask are never scored: a policy with `output_head` runs its output
    layer on the masked positions only (`head_logprobs`); any other policy computes logits
    from `first_loss_position(mask)` on.
    """
    mask = mask.to(input_ids.device) != 0
    hidden_fn = getattr(policy, "output_head", None)
    head = hidden_fn() if hidden_fn is not None else None
    if head is None:
        start = first_loss_position(mask)
        logits = policy.logits(input_ids, attention_mask, keep_from=start)[:, :-1]
        if temperature != 1.0:
            logits = logits / temperature
        # Image slot ids (negative, `models.images`) are context, never targets: any index will do there.
        logp = F.pad(token_logprobs(logits, input_ids[:, start + 1 :].clamp(min=0)), (start, 0))
        ent = torch.where(mask, F.pad(entropy_from_logits(logits), (start, 0)), 0.0) if entropy else None
        return torch.where(mask, logp, 0.0), ent
    weight, bias = head
    if temperature != 1.0:  # logits / T = hidden @ (W / T).T + b / T
        weight, bias = weight / temperature, None if bias is None else bias / temperature
    hidden = policy.hidden_states(input_ids, attention_mask)[:, :-1]
    where = mask.nonzero(as_tuple=True)
    picked, picked_ent = head_logprobs(hidden[where], weight, bias, input_ids[:, 1:][where], entropy=entropy)
    logp = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put(where, picked)
    ent = hidden.new_zeros(mask.shape, dtype=torch.float32).index_put(where, picked_ent) if entropy else None
    return logp, ent


def sequence_logprobs(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep_from: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1 of a right-padded batch, `[B, T-1]`; 0 where x_t is padding
    and for t <= `keep_from` (positions the caller does not need, never computed).

    `temperature` scales the logits first: the log-probs of the distribution a sampler at
    that temperature drew from, which is the policy RL optimises."""
    mask = attention_mask[:, 1:] != 0
    mask[:, :keep_from] = False
    return masked_token_logprobs(policy, input_ids, attention_mask, mask, temperature=temperature)[0]


def shared_prefix_logprobs(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                           prefix_len: torch.Tensor, *, entropy: bool = False, temperature: float = 1.0):
    """`masked_token_logprobs`, with each distinct prefix run once for all the rows that start with it.

    Why: the G completions of an RL group share their prompt; running it G times is most of an
    update's work when prompts are long. Row b's first `prefix_len[b]` tokens are context (its
    mask is 0 there). All of them but the last form the shared prefix: the rows with the same
    shared tokens get one forward of them (left-padded, with gradient), and each row runs its
    last prefix token (which scores the first completion token) and its completion on the
    prefix's keys and values. Same values and gradients as `masked_token_logprobs` to float
    rounding; falls back to it when the policy cannot share (`prefix_sharing`), a row trains on
    a prefix position, or a prefix has no shared token.
    """
    device = input_ids.device
    mask = mask.to(device) != 0
    cut = (prefix_len.to(device) - 1).clamp(min=0)
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=device)
    can = getattr(policy, "prefix_sharing", None)
    if (can is None or not can() or not bool((cut > 0).all())
            or bool((mask & (positions[None] < cut[:, None])).any())):
        return masked_token_logprobs(policy, input_ids, attention_mask, mask, entropy=entropy, temperature=temperature)
    owners: dict[tuple[int, ...], int] = {}
    ids, cuts, ends = input_ids.tolist(), cut.tolist(), lengths.tolist()
    owner = [owners.setdefault(tuple(row[:c]), len(owners)) for row, c in zip(ids, cuts)]
    prefix_ids, prefix_mask = pad_batch([list(p) for p in owners], policy.pad_id, left=True)
    rows_ids, rows_mask = pad_batch([row[c:e] for row, c, e in zip(ids, cuts, ends)], policy.pad_id)
    # rows_mask[b, j] (next-token position j of the row) is mask[b, cut[b] + j]
    width = rows_ids.shape[1] - 1
    index = (cut[:, None] + torch.arange(width, device=device)[None]).clamp(max=mask.shape[1] - 1)
    row_loss = mask.gather(1, index) & (torch.arange(width, device=device)[None] < (lengths - cut - 1)[:, None])
    args = (prefix_ids.to(device), prefix_mask.to(device), torch.tensor(owner, device=device),
            rows_ids.to(device), rows_mask.to(device))
    hidden_fn = getattr(policy, "output_head", None)
    head = hidden_fn() if hidden_fn is not None else None
    where = row_loss.nonzero(as_tuple=True)
    targets = rows_ids.to(device)[:, 1:][where]
    if head is None:
        logits = policy.prefix_shared_logits(*args)[:, :-1][where]
        if temperature != 1.0:
            logits = logits / temperature
        picked = token_logprobs(logits, targets)
        picked_ent = entropy_from_logits(logits) if entropy else None
    else:
        weight, bias = head
        if temperature != 1.0:
            weight, bias = weight / temperature, None if bias is None else bias / temperature
        hidden = policy.prefix_shared_hidden(*args)[:, :-1]
        picked, picked_ent = head_logprobs(hidden[where], weight, bias, targets, entropy=entropy)
    at = (where[0], cut[where[0]] + where[1])  # back to the rows' own positions
    logp = picked.new_zeros(mask.shape).index_put(at, picked)
    ent = picked.new_zeros(mask.shape).index_put(at, picked_ent) if entropy else None
    return logp, ent
