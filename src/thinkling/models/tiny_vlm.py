"""A tiny vision-language model trained from scratch: ViT patch encoder -> MLP connector -> tiny LM.

The laptop stand-in for a small VLM (LLaVA layout): the image is cut into patches, a small
ViT encodes them, a two-layer MLP projects each patch feature into the language model's
embedding space, and those vectors sit in the prompt as prefix tokens before its text. The
language model is `tiny.TinyTransformer`, unchanged.

The interface a vision-language policy follows (the HF one as well):
- `accepts_images = True`, and `encode_prompt(prompt, images=(img, ...))` takes PIL images
  (RGB) besides the text; a text-only problem calls `encode_prompt(prompt)` as for any policy;
  `rollout.prompts.prompt_ids` is the one caller, passing `Problem.images`;
- the images ride in the returned `list[int]` as slot ids (`models.images`: negative ids,
  one per embedding the model feeds for an image, content-addressed handles). So
  `generate` / `sample` / `logits` / `prefix_shared_logits` / `models.logprobs` and every
  trainer take image prompts with the same signatures as text ones; prompt deduplication and
  RL prefix sharing key on the ids and so never confuse two pictures;
- slots are context: the SFT and RL loss masks cover completion tokens only, and
  `models.logprobs` never scores a slot as a target.

Sequence layout of a prompt: `[bos] + slots(image 1) + ... + slots(image k) + text`.

TinyAlign (`model.tiny.tinyalign: {top_k, bank_size}`, `models.tinyalign`): a memory bank of the
training pairs, keyed on fixed pixel / text features, is built when training starts
(`build_memory`) and saved with the policy. `encode_prompt` retrieves the top_k entries nearest
to (pictures, prompt text), leaving out the prompt's own entry, and writes them as top_k more
slots after the last image's: slot j >= n_image_tokens of an image stands for bank entry
j - n_image_tokens, which the forward pass turns into a token through the memory connector.
Retrieval therefore happens once per prompt, and every sampler, log-prob and trainer path takes
it unchanged; like image slots, memory slots are context and never a loss target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thinkling.errors import ThinklingError
from thinkling.models import images as image_store
from thinkling.models.base import SamplingParams, config_from_mapping
from thinkling.models.tiny import TinyConfig, TinyPolicy, TinyTransformer
from thinkling.models.tinyalign import (
    BANK_FILE,
    VALUE_DIM,
    MemoryBank,
    TinyAlignConfig,
    build_bank,
    image_key,
    load_bank,
    memory_connector,
    retrieve,
)
from thinkling.models.tokenizer import CharTokenizer


@dataclass
class VisionConfig:
    """The image encoder: `image_size`² RGB inputs (resized to it), `patch_size`² patches, a ViT
    of `n_layers` pre-norm blocks of width `d_model`, and the connector's hidden width."""

    image_size: int = 36
    patch_size: int = 6
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    connector_hidden: int = 128

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ThinklingError(f"model config 'vision.{f.name}': must be a positive integer (got {v!r})")
        if self.image_size % self.patch_size:
            raise ThinklingError(f"model config 'vision.patch_size': {self.patch_size} must divide "
                                 f"image_size {self.image_size}")
        if self.d_model % self.n_heads:
            raise ThinklingError(f"model config 'vision.n_heads': must divide d_model {self.d_model}")

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def vlm_config(d: dict, vocab_size: int) -> tuple[TinyConfig, VisionConfig, TinyAlignConfig | None]:
    """`model.tiny` of a `tiny_vlm` recipe: the TinyConfig keys, plus `vision: {VisionConfig keys}`
    and, for a TinyAlign connector, `tinyalign: {TinyAlignConfig keys}`."""
    if not isinstance(d, dict):
        raise ThinklingError(f"model config: expected a mapping (got {type(d).__name__})")
    d = dict(d)
    vision = config_from_mapping(VisionConfig, d.pop("vision", {}) or {}, "vision")
    tinyalign = d.pop("tinyalign", None)  # absent or null: the plain connector
    tinyalign = None if tinyalign is None else TinyAlignConfig.from_mapping(tinyalign)
    return TinyConfig.from_dict({"vocab_size": vocab_size, **d}), vision, tinyalign


class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """Patches -> linear embedding + learned positions -> ViT blocks -> LayerNorm, `[U, N, d]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Linear(3 * cfg.patch_size**2, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.n_patches, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels [U, 3, S, S]` in [0, 1]."""
        p = self.cfg.patch_size
        x = pixels * 2 - 1
        U, C, H, W = x.shape
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(U, -1, C * p * p)
        x = self.patch(patches) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TinyVLM(nn.Module):
    """Vision encoder + connector + `TinyTransformer`. It answers the calls `TinyPolicy` makes
    of its model (`hidden`, `forward`, `new_cache`, `embed`, `lm_head`, `config`, `shares_prompt_keys`), replacing
    image slot ids by the image's projected patch features, so the tiny policy's sampler, KV
    cache and prefix sharing work unchanged."""

    def __init__(self, lm_config: TinyConfig, vision: VisionConfig, tinyalign: TinyAlignConfig | None = None):
        super().__init__()
        self.vision_config, self.tinyalign = vision, tinyalign
        self.lm = TinyTransformer(lm_config)
        self.vision = VisionEncoder(vision)
        self.connector = nn.Sequential(nn.Linear(vision.d_model, vision.connector_hidden), nn.GELU(),
                                       nn.Linear(vision.connector_hidden, lm_config.d_model))
        for m in (*self.vision.modules(), *self.connector.modules()):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                nn.init.zeros_(m.bias)
        self.bank: MemoryBank | None = None  # TinyAlign: built from the training pairs, saved with the policy
        if tinyalign is not None:  # made last, so the rest starts as the plain twin's weights
            self.memory_connector = memory_connector(VALUE_DIM, vision.connector_hidden, lm_config.d_model)
            for m in self.memory_connector.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
                    nn.init.zeros_(m.bias)
        self._pixel_cache: dict[int, torch.Tensor] = {}  # handle -> [3, S, S] at this model's size
        self._key_cache: dict[int, torch.Tensor] = {}  # handle -> its TinyAlign image key

    @property
    def config(self) -> TinyConfig:
        return self.lm.config

    @property
    def embed(self) -> nn.Embedding:
        return self.lm.embed

    @property
    def lm_head(self) -> nn.Linear:
        return self.lm.lm_head

    @property
    def shares_prompt_keys(self) -> bool:
        return self.lm.shares_prompt_keys

    @property
    def n_image_tokens(self) -> int:
        return self.vision_config.n_patches

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, capacity: int):
        return self.lm.new_cache(batch, capacity)

    def pixels(self, handle: int) -> torch.Tensor:
        """A stored image as `[3, S, S]` floats in [0, 1], resized (bilinear) to `image_size`."""
        t = self._pixel_cache.get(handle)
        if t is None:
            from PIL import Image

            array = image_store.pixels(handle)
            s = self.vision_config.image_size
            if array.shape[:2] != (s, s):
                array = np.asarray(Image.fromarray(array).resize((s, s), Image.BILINEAR))
            t = self._pixel_cache[handle] = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
        return t

    @property
    def slots_per_image(self) -> int:
        """The largest slot index + 1 a prompt may hold: image tokens, then bank entries (TinyAlign)."""
        return self.n_image_tokens + (len(self.bank) if self.bank is not None else 0)

    def image_key(self, handle: int) -> torch.Tensor:
        key = self._key_cache.get(handle)
        if key is None:
            key = self._key_cache[handle] = image_key(image_store.pixels(handle))
        return key

    def memory_tokens(self, entries: torch.Tensor) -> torch.Tensor:
        """`[N, d_model]`: bank entries' values through the memory connector (the bank is fixed)."""
        weight = self.memory_connector[0].weight
        values = self.bank.values[entries.cpu()].to(weight.device, weight.dtype)
        return self.memory_connector(values).to(self.lm.embed.weight.dtype)

    def image_embeddings(self, handles: list[int]) -> torch.Tensor:
        """The prefix tokens of images `[U, n_image_tokens, d_model]`: ViT features through the connector."""
        w = self.lm.embed.weight
        pixels = torch.stack([self.pixels(h) for h in handles]).to(device=w.device)
        return self.connector(self.vision(pixels)).to(w.dtype)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[B, T, d]`, image slot ids replaced by their image's features."""
        slots = ids < 0
        x = self.lm.embed(ids.clamp(min=0))
        if not bool(slots.any()):
            return x
        handle, j = image_store.split_slot(ids[slots])
        if bool((j >= self.slots_per_image).any()):
            raise ThinklingError(f"model: an image slot index exceeds the model's {self.n_image_tokens} image tokens"
                                 + (f" + {len(self.bank)} memory entries" if self.bank is not None else ""))
        where = slots.nonzero(as_tuple=True)
        image = j < self.n_image_tokens
        if bool(image.any()):
            unique, inverse = torch.unique(handle[image], return_inverse=True)
            features = self.image_embeddings(unique.tolist())
            x = x.index_put(tuple(w[image] for w in where), features[inverse, j[image]])
        if not bool(image.all()):  # TinyAlign memory slots: slot n_image_tokens + e is bank entry e
            x = x.index_put(tuple(w[~image] for w in where), self.memory_tokens(j[~image] - self.n_image_tokens))
        return x

    def hidden(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None, **kw):
        """`TinyTransformer.hidden`, with image slots in `input_ids` embedded as images."""
        if input_ids is not None and inputs_embeds is None and bool((input_ids < 0).any()):
            input_ids, inputs_embeds = None, self.embed_ids(input_ids)
        return self.lm.hidden(input_ids, inputs_embeds=inputs_embeds, **kw)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None):
        h = self.hidden(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=position_ids, cache=cache)
        return self.lm.lm_head(h)


class TinyVLMPolicy(TinyPolicy):
    """The `Policy` of a `TinyVLM`: `TinyPolicy`'s sampler and log-probs, plus image prompts."""

    accepts_images = True

    @classmethod
    def create(cls, config: dict, seed: int = 0) -> TinyVLMPolicy:
        """A freshly initialised model; the same config and seed give the same weights."""
        tokenizer = CharTokenizer()
        lm_config, vision, tinyalign = vlm_config(config, tokenizer.vocab_size)
        if lm_config.vocab_size != tokenizer.vocab_size:
            raise ThinklingError(f"model config 'vocab_size': must be {tokenizer.vocab_size} for the character "
                                 f"tokenizer (got {lm_config.vocab_size})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TinyVLM(lm_config, vision, tinyalign)
        return cls(model, tokenizer)

    def encode_prompt(self, prompt: str, images=()) -> list[int]:
        ids = [self.bos_id]
        handles = [image_store.register(image) for image in images]
        for h in handles:
            ids += image_store.slot_ids(h, self.model.n_image_tokens)
        if self.model.tinyalign is not None and handles:
            ids += [image_store.slot_id(handles[-1], self.model.n_image_tokens + e) for e in self.retrieve(handles, prompt)]
        return ids + self.tokenizer.encode(prompt)

    def retrieve(self, handles: list[int], prompt: str) -> list[int]:
        """TinyAlign: the bank entries nearest to (pictures, prompt), best first, the prompt's own left out."""
        return retrieve(self.model.bank, self.model.tinyalign.top_k, handles, prompt, self.model.image_key)

    def build_memory(self, pairs: list[tuple[tuple, str, str]]) -> bool:
        """TinyAlign: build the memory bank from training pairs `(images, prompt text, target text)`
        (`tinyalign.build_bank`), unless the policy already has one (a resumed run, or a policy
        trained before): the bank belongs to the weights trained with it. Returns whether it built."""
        cfg = self.model.tinyalign
        if cfg is None or self.model.bank is not None:
            return False
        self.model.bank = build_bank(pairs, cfg, self.model.image_key)
        return True

    def _budgets(self, prompts: list[list[int]], params: SamplingParams) -> list[int]:
        """`TinyPolicy._budgets`, with image slots checked apart from vocabulary ids."""
        for i, p in enumerate(prompts):
            handles, j = image_store.split_slot(np.array([t for t in p if t < 0], dtype=np.int64))
            if len(j) and int(j.max()) >= self.model.slots_per_image:
                raise ThinklingError(f"generate: prompt {i} has an image slot beyond the model's "
                                     f"{self.model.n_image_tokens} image tokens (and memory entries)")
            for h in set(handles.tolist()):
                image_store.pixels(h)  # an unknown handle fails here, before any work
        return super()._budgets([[max(t, 0) for t in p] for p in prompts], params)

    backend = "tiny_vlm"

    def config_dict(self) -> dict:
        tinyalign = {"tinyalign": asdict(self.model.tinyalign)} if self.model.tinyalign is not None else {}
        return {**self.model.config.to_dict(), "vision": asdict(self.model.vision_config), **tinyalign}

    @classmethod
    def model_from_config(cls, saved: dict, tokenizer: CharTokenizer) -> TinyVLM:
        if not isinstance(saved, dict):
            raise ThinklingError("config.json is not a mapping")
        lm_config, vision, tinyalign = vlm_config({k: v for k, v in saved.items() if k != "vocab_size"},
                                                  saved.get("vocab_size", tokenizer.vocab_size))
        return TinyVLM(lm_config, vision, tinyalign)

    def save(self, directory: str) -> None:
        """`TinyPolicy.save`, plus the TinyAlign memory bank when there is one."""
        super().save(directory)
        if self.model.bank is not None:
            self.model.bank.save(Path(directory) / BANK_FILE)

    @classmethod
    def load(cls, directory: str) -> TinyVLMPolicy:
        policy = super().load(directory)
        file = Path(directory) / BANK_FILE
        if policy.model.tinyalign is not None and file.is_file():
            policy.model.bank = load_bank(file)
        return policy
