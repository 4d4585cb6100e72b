"""TinyAlign: a retrieval-augmented vision-language connector.

A small language model gets little out of image features through a connector alone. TinyAlign
adds context retrieved from the training data: a memory bank of (key, value) entries, one per
training pair, where

- the key is the fused embedding `normalise(concat(0.4 * normalise(img), 0.6 * normalise(txt)))`
  of the pair's pooled image features and its input-text embedding (what is known at inference
  time: image + prompt, never the answer);
- the value is a compact multimodal latent of the pair (any `[N, V]` tensor the caller computes,
  e.g. from image + answer; by default the key itself).

Each forward pass fuses the current (image, text) the same way, retrieves the top-k entries by
cosine similarity, and a second small connector maps their values to k extra tokens placed right
after the image tokens. They are context: `splice_prefix` gives them (and the image tokens) the
label `IGNORE_INDEX`, so no loss is ever taken on them. When the queries are the training pairs
themselves, pass their ids as `exclude`: an entry never retrieves itself (it would hold the
answer being trained on).

Retrieval is an exact matmul in torch rather than a faiss index: the reference uses a flat
inner-product index, which is the same computation; banks for small VLMs (thousands to a few
hundred thousand pairs) take milliseconds on a CPU; the result is exact and deterministic
(ties go to the lower index), runs on the model's device, and needs no extra dependency.

`TinyAlign` wraps any connector `image_features [B, P, Di] -> tokens [B, Ni, D]`, so it sits
on a from-scratch tiny VLM or a Hugging Face one alike.

Fixed pair features (`image_key`, `text_key`, `pair_value`, `pair_source`): what the tiny VLM's
recipe-driven TinyAlign (`model.tiny.tinyalign`, docs/vlm.md) keys and fills its bank with. They
come from the pixels and the text alone, never from trained weights, so a query made at any
training step (or at evaluation) lives in the same space as the bank built before step 1, and
retrieval for a prompt can be done once, when it is encoded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thinkling.errors import ThinklingError
from thinkling.files import atomic_write_bytes
from thinkling.models import images as image_store
from thinkling.models.base import config_from_mapping

IGNORE_INDEX = -100  # the label of a position no loss is taken on (torch's cross-entropy default)
IMAGE_WEIGHT, TEXT_WEIGHT = 0.4, 0.6
THUMBNAIL = 12  # an image key is its 12x12 RGB thumbnail (432 numbers)
TEXT_BUCKETS = 128  # a text key is its words and lines hashed into 128 counts
IMAGE_DIM = 3 * THUMBNAIL**2
VALUE_DIM = IMAGE_DIM + TEXT_BUCKETS
BANK_FILE = "memory_bank.safetensors"  # a TinyAlign policy's bank, saved next to its weights


@dataclass
class TinyAlignConfig:
    """A recipe's TinyAlign settings (`model.tiny.tinyalign` of a tiny VLM, `model.tinyalign` of an
    hf_vlm one): `top_k` retrieved entries (= extra tokens per prompt) from a bank of at most
    `bank_size` training pairs (the first ones; None: every pair)."""

    top_k: int = 4
    bank_size: int | None = None

    def __post_init__(self):
        for name in ("top_k", "bank_size"):
            v = getattr(self, name)
            if (v is not None or name == "top_k") and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ThinklingError(f"model config 'tinyalign.{name}': must be a positive integer (got {v!r})")
        if self.top_k > 64:
            raise ThinklingError(f"model config 'tinyalign.top_k': at most 64 retrieved tokens (got {self.top_k})")
        if self.bank_size is not None and self.bank_size > image_store.SLOT_STRIDE // 2:
            raise ThinklingError(f"model config 'tinyalign.bank_size': at most {image_store.SLOT_STRIDE // 2} "
                                 f"pairs (got {self.bank_size})")

    @classmethod
    def from_mapping(cls, section) -> TinyAlignConfig:
        """The settings of a recipe's `tinyalign` mapping, unknown keys refused by name."""
        return config_from_mapping(cls, section, "tinyalign")


def image_key(array: np.ndarray) -> torch.Tensor:
    """`[IMAGE_DIM]`: the `uint8 [H, W, 3]` picture as a 12x12 bilinear thumbnail, standardised per
    picture (so a background shade or a global brightness shift does not count as similarity)."""
    from PIL import Image

    small = np.asarray(Image.fromarray(array).resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR), dtype=np.float32)
    x = torch.from_numpy(small.copy()).flatten() / 255
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def _bucket(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "little") % TEXT_BUCKETS


def text_key(text: str) -> torch.Tensor:
    """`[TEXT_BUCKETS]`: counts of the text's words and of its whole lines, hashed (stable across
    processes, unlike Python's `hash`). Lines keep which words go together (`tl red circle`)."""
    x = torch.zeros(TEXT_BUCKETS)
    for line in text.split("\n"):
        words = line.split()
        for token in words + ([f"line:{' '.join(words)}"] if len(words) > 1 else []):
            x[_bucket(token)] += 1
    return x


def pair_value(image: torch.Tensor, target: str) -> torch.Tensor:
    """`[VALUE_DIM]`: the compact latent of a training pair, its image key next to its target
    text's key, each unit length."""
    return torch.cat([F.normalize(image, dim=-1), F.normalize(text_key(target), dim=-1)])


def pair_source(arrays: list[np.ndarray], prompt: str) -> int:
    """A 63-bit content id of (pictures, prompt): a query leaves out every bank entry with its own
    id, so a training pair never retrieves itself (nor an exact duplicate of itself)."""
    h = hashlib.blake2b(prompt.encode(), digest_size=8)
    for a in arrays:
        h.update(repr(a.shape).encode() + a.tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def prompt_keys(handles: list[int], prompt: str, key_of=None):
    """(image key: the mean over the prompt's pictures `handles` (`models.images`), text key, source
    id) of a prompt. `key_of(handle)`: a caller's cached `image_key` of a stored picture."""
    key_of = key_of or (lambda h: image_key(image_store.pixels(h)))
    image = torch.stack([key_of(h) for h in handles]).mean(0)
    return image, text_key(prompt), pair_source([image_store.pixels(h) for h in handles], prompt)


def retrieve(bank: MemoryBank | None, top_k: int, handles: list[int], prompt: str, key_of=None) -> list[int]:
    """The `top_k` bank entries nearest to (pictures, prompt), best first, the prompt's own left out."""
    if bank is None:
        raise ThinklingError("model config 'tinyalign': this policy has no memory bank yet; it is built from the "
                             "training pairs when `thinkling sft` (or rl) starts")
    image, text, source = prompt_keys(handles, prompt, key_of)
    _, index = bank.search(bank.query_keys(image[None], text[None]), top_k, exclude=torch.tensor([source]))
    return index[0].tolist()


def build_bank(pairs: list[tuple], cfg: TinyAlignConfig, key_of=None) -> MemoryBank:
    """The memory bank of training pairs `(pictures, prompt text, target text)` with pictures (the
    first `cfg.bank_size`): keys from pictures + prompt, values from pictures + target.
    Deterministic: the same pairs give the same bank, bit for bit."""
    pairs = [p for p in pairs if p[0]][: cfg.bank_size]
    if len(pairs) <= cfg.top_k:
        raise ThinklingError(f"model config 'tinyalign.top_k': {cfg.top_k}, but only {len(pairs)} training pairs "
                             "with pictures to build the memory bank from (need more than top_k)")
    keys = [prompt_keys([image_store.register(p) for p in pictures], prompt, key_of) for pictures, prompt, _ in pairs]
    images, texts, sources = zip(*keys)
    values = [pair_value(image, target) for image, (_, _, target) in zip(images, pairs)]
    return MemoryBank.build(torch.stack(images), torch.stack(texts), torch.stack(values), torch.tensor(sources),
                            meta={"features": "thumbnail12+hashed-text128"})


def load_bank(path: Path) -> MemoryBank:
    """A saved bank of this version's fixed pair features, or one error naming the file."""
    bank = MemoryBank.load(path)
    if bank.keys.shape[1] != IMAGE_DIM + TEXT_BUCKETS or bank.values.shape[1] != VALUE_DIM:
        raise ThinklingError(f"{path}: keys / values of {bank.keys.shape[1]} / {bank.values.shape[1]} dims, "
                             "not this version's TinyAlign features")
    return bank


def memory_connector(value_dim: int, hidden: int, lm_dim: int) -> nn.Sequential:
    """TinyAlign's second connector: one retrieved value -> one LM-space token."""
    return nn.Sequential(nn.Linear(value_dim, hidden), nn.GELU(), nn.Linear(hidden, lm_dim))


def pool(image_features: torch.Tensor) -> torch.Tensor:
    """One vector per image: the mean over patches of `[B, P, D]` (a `[B, D]` input is kept)."""
    return image_features.mean(dim=1) if image_features.dim() == 3 else image_features


def fuse(image: torch.Tensor, text: torch.Tensor, image_weight: float = IMAGE_WEIGHT,
         text_weight: float = TEXT_WEIGHT) -> torch.Tensor:
    """Unit fused keys `[N, Di + Dt]`: each part normalised first, so the weights, not the encoders'
    scales, set how much image and text count in the cosine similarity."""
    if image.shape[0] != text.shape[0]:
        raise ThinklingError(f"TinyAlign: {image.shape[0]} image rows but {text.shape[0]} text rows")
    parts = [image_weight * F.normalize(pool(image).float(), dim=-1), text_weight * F.normalize(text.float(), dim=-1)]
    return F.normalize(torch.cat(parts, dim=-1), dim=-1)


@dataclass
class MemoryBank:
    """Retrieval memory: unit `keys [N, K]`, `values [N, V]`, and `sources [N]`, the training
    example each entry came from (queries from that example leave it out)."""

    keys: torch.Tensor
    values: torch.Tensor
    sources: torch.Tensor
    image_weight: float = IMAGE_WEIGHT
    text_weight: float = TEXT_WEIGHT
    meta: dict = field(default_factory=dict)  # free-form strings saved with the bank (what encoders built it)

    @classmethod
    def build(cls, image_features: torch.Tensor, text_embeddings: torch.Tensor, values: torch.Tensor | None = None,
              sources: torch.Tensor | None = None, *, image_weight: float = IMAGE_WEIGHT,
              text_weight: float = TEXT_WEIGHT, meta: dict | None = None) -> MemoryBank:
        """A bank of the training pairs `(image_features[i], text_embeddings[i])` (sources default
        to 0..N-1). Deterministic: the same inputs give the same bank, bit for bit."""
        with torch.no_grad():
            keys = fuse(image_features, text_embeddings, image_weight, text_weight)
            values = keys.clone() if values is None else values.detach().float().clone()
        n = keys.shape[0]
        sources = torch.arange(n) if sources is None else torch.as_tensor(sources, dtype=torch.long).clone()
        if values.shape[0] != n or sources.shape != (n,):
            raise ThinklingError(f"TinyAlign memory bank: {n} keys, {values.shape[0]} values, "
                                 f"{tuple(sources.shape)} sources; need one of each per pair")
        return cls(keys.contiguous(), values.contiguous(), sources.to(keys.device), image_weight, text_weight,
                   {str(k): str(v) for k, v in (meta or {}).items()})

    def __len__(self) -> int:
        return self.keys.shape[0]

    def to(self, device) -> MemoryBank:
        return MemoryBank(self.keys.to(device), self.values.to(device), self.sources.to(device),
                          self.image_weight, self.text_weight, dict(self.meta))

    def query_keys(self, image_features: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """Fused keys of the current inputs, weighted as the bank's."""
        return fuse(image_features, text_embedding, self.image_weight, self.text_weight)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None):
        """(cosine scores `[B, k]`, entry indices `[B, k]`) of the k nearest entries of each unit
        query, best first; entries whose source equals `exclude[b]` are skipped for row b."""
        if queries.shape[-1] != self.keys.shape[1]:
            raise ThinklingError(f"TinyAlign: query keys have {queries.shape[-1]} dims, the bank's {self.keys.shape[1]}")
        available = len(self) - (self._max_per_source() if exclude is not None else 0)
        if not 0 < k <= available:
            raise ThinklingError(f"TinyAlign: top_k {k} but the bank has {available} entries to retrieve from")
        scores = queries.float().to(self.keys.device) @ self.keys.T
        if exclude is not None:
            own = self.sources[None, :] == torch.as_tensor(exclude, device=self.keys.device)[:, None]
            scores = scores.masked_fill(own, float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return scores.gather(1, order), order

    def _max_per_source(self) -> int:
        return int(torch.unique(self.sources, return_counts=True)[1].max()) if len(self) else 0

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically; `load` restores it exactly."""
        from safetensors.torch import save

        meta = {**self.meta, "image_weight": repr(self.image_weight), "text_weight": repr(self.text_weight)}
        data = save({"keys": self.keys.cpu().contiguous(), "values": self.values.cpu().contiguous(),
                     "sources": self.sources.cpu().contiguous()}, metadata=meta)
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in ("keys", "values", "sources")}
            weights = float(meta.pop("image_weight")), float(meta.pop("text_weight"))
        except (OSError, SafetensorError, KeyError, ValueError) as e:
            raise ThinklingError(f"{path}: not a TinyAlign memory bank ({e})") from None
        return cls(tensors["keys"], tensors["values"], tensors["sources"], *weights, meta)


class TinyAlign(nn.Module):
    """A connector with retrieved context: `forward(image_features, text_embedding)` returns the
    wrapped connector's image tokens followed by `top_k` retrieved-memory tokens `[B, Ni + k, D]`."""

    def __init__(self, connector: nn.Module, bank: MemoryBank, lm_dim: int, *, top_k: int = 4,
                 hidden: int | None = None):
        super().__init__()
        self.connector = connector
        self.bank = bank
        self.top_k = top_k
        hidden = hidden or lm_dim
        # the second connector: retrieved value -> one LM-space token
        self.memory_connector = memory_connector(bank.values.shape[1], hidden, lm_dim)

    def retrieve(self, image_features: torch.Tensor, text_embedding: torch.Tensor,
                 exclude: torch.Tensor | None = None):
        """(scores `[B, k]`, indices `[B, k]`) of the entries retrieved for these inputs."""
        return self.bank.search(self.bank.query_keys(image_features.detach(), text_embedding.detach()),
                                self.top_k, exclude)

    def memory_tokens(self, image_features: torch.Tensor, text_embedding: torch.Tensor,
                      exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The extra tokens `[B, k, D]`: the retrieved values through the second connector (the bank
        itself is fixed; gradients reach the second connector only)."""
        _, index = self.retrieve(image_features, text_embedding, exclude)
        values = self.bank.values.to(index.device)[index]
        weight = self.memory_connector[0].weight
        return self.memory_connector(values.to(weight.device, weight.dtype))

    def forward(self, image_features: torch.Tensor, text_embedding: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        """`exclude[b]`: the source id of row b when it is a training pair (it never retrieves itself)."""
        tokens = self.connector(image_features)
        extra = self.memory_tokens(image_features, text_embedding, exclude)
        return torch.cat([tokens, extra.to(tokens.dtype)], dim=1)


def splice_prefix(prefix: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None):
    """Inputs `[B, P + T, D]`, labels `[B, P + T]` and attention mask `[B, P + T]` of prefix tokens
    (image tokens, then TinyAlign's memory tokens) followed by the text: every prefix position is
    labelled `IGNORE_INDEX`, so image and memory tokens are context only. `labels` / `attention_mask`
    are the text's (None: no labels / all attended)."""
    b, p = prefix.shape[:2]
    inputs = torch.cat([prefix.to(text_embeds.dtype), text_embeds], dim=1)
    ones = torch.ones(b, p, dtype=torch.long, device=text_embeds.device)
    text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.long, device=text_embeds.device) \
        if attention_mask is None else attention_mask.long()
    mask = torch.cat([ones, text_mask], dim=1)
    if labels is None:
        return inputs, None, mask
    return inputs, torch.cat([torch.full_like(ones, IGNORE_INDEX), labels], dim=1), mask
