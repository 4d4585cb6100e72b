"""A Hugging Face vision-language model behind the `Policy` protocol.

Any `AutoModelForImageTextToText` with its processor works: LLaVA, Idefics3 / SmolVLM,
Qwen2-VL / Qwen2.5-VL. It is an `HFPolicy` whose prompts may carry images, following the
library's convention (`models.images`): images ride inside the prompt ids, so the shared
SFT / RL / BREAD code takes image prompts unchanged (`model.backend: hf_vlm` in a recipe).

- `encode_prompt(prompt, images)` renders the processor's chat template with one image
  placeholder per image (before the text) and lets the processor expand each placeholder
  into the model's image tokens; then image k's j-th image token is written as slot id
  `slot_id(handle_k, j)` (negative, never a vocabulary id). The processor's other tokens
  around images (Idefics3's row / column markers, Qwen2-VL's vision start / end) stay as they are.
- `logits` and `generate_reference` (behind `sample` / `generate`) turn the slots back into
  the image token id and recompute the pixel inputs from the stored images (an image starts
  at its slot 0), with the processor's image processor resizing and splitting them exactly
  as `encode_prompt` did. A prompt with no images is a plain text prompt.

Only completion tokens are trained: the trainers' loss masks cover completion tokens only, and
`models.logprobs` never scores a slot as a target. The vision tower is frozen by default (its
features were aligned in pre-training; training it with a small RL batch mostly adds memory);
LoRA goes on the language model only.

TinyAlign (`model.tinyalign: {top_k, bank_size}`, `models.tinyalign`), as on the tiny VLM: a
memory bank of the training pairs keyed on fixed pixel / text features is built when training
starts (`build_memory`); `encode_prompt` retrieves the top_k entries nearest to (pictures, prompt
text), leaving out the prompt's own entry, and writes them right after the last image's tokens as
slots `n_image_tokens + entry` of that image. `model_inputs` turns each such slot into a text
placeholder token whose input embedding `MemoryTokens` replaces by the entry's value through the
second connector. Like image slots they are context, never a loss target. The second connector
and the bank are saved beside the weights (with LoRA, beside the adapters).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from thinkling.errors import ThinklingError
from thinkling.files import atomic_write_bytes, atomic_write_text, read_json
from thinkling.models import images as image_store
from thinkling.models.hf import (
    LLAMA_PROJECTIONS,
    LORA_DEFAULTS,
    HFPolicy,
    _apply_lora,
    _check_dtype,
    _dtype_name,
    _from_pretrained,
    _portable,
    resolve_dtype,
)
from thinkling.models.registry import resolve_model
from thinkling.models.tinyalign import (
    BANK_FILE,
    VALUE_DIM,
    MemoryBank,
    TinyAlignConfig,
    build_bank,
    load_bank,
    memory_connector,
    retrieve,
)

BACKEND = "hf_vlm"
MEMORY_MODULE = "tinyalign_memory"  # TinyAlign's `MemoryTokens`, an attribute of the transformers model
CONNECTOR_FILE = "tinyalign_connector.safetensors"
# Where the families keep their vision encoder and their vision -> text connector.
VISION_MODULES = ("vision_tower", "vision_model", "visual")
CONNECTOR_MODULES = ("multi_modal_projector", "connector", "merger")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _find(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Qualified names of the submodules called one of `names` (outermost only)."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in names and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def vision_module_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the vision encoder(s) of a transformers VLM (Qwen2-VL's connector,
    `visual.merger`, sits inside its encoder)."""
    return _find(_base_model(model), VISION_MODULES)


def language_module_name(model: torch.nn.Module) -> str:
    """Qualified name of the language model (the decoder the image features are fed into)."""
    base = _base_model(model)
    decoder = base.get_decoder()
    for name, module in base.named_modules():
        if module is decoder:
            return name
    raise ThinklingError(f"{type(base).__name__}: cannot find its language model")


def language_lora_targets(model: torch.nn.Module) -> list[str]:
    """The linear layers LoRA wraps: the Llama-style projections of the language model if it
    has them, else all its linear layers; never a vision or connector layer."""
    prefix = language_module_name(model) + "."
    linear = [n for n, m in _base_model(model).named_modules()
              if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]
    projections = [n for n in linear if n.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS]
    return projections or linear


def freeze_vision(model: torch.nn.Module) -> None:
    """Stop gradients into the vision encoder(s), but not into a connector they hold (Qwen2-VL's
    `visual.merger`): the connector is what adapts image features to the language model."""
    base = _base_model(model)
    for name in vision_module_names(base):
        encoder = base.get_submodule(name)
        encoder.requires_grad_(False)
        for connector in _find(encoder, CONNECTOR_MODULES):
            encoder.get_submodule(connector).requires_grad_(True)


class MemoryTokens(nn.Module):
    """TinyAlign on a transformers VLM: the second connector (one retrieved value -> one LM-space
    token) and the memory bank. `arm(ids, where, entries)` makes the input-embedding layer's next
    call on exactly `ids` return, at positions `where`, the entries' tokens instead of the
    placeholder's embedding.

    Why a hook on the input embeddings rather than passing `inputs_embeds`: the model's own
    forward still embeds the ids, merges its image features, and under `generate` handles left
    padding, positions and its KV cache exactly as without TinyAlign (`generate` given embeddings
    would also drop the prompt from its output). Only the call on the armed ids (the training
    forward, or generation's prefill) is changed; decode steps embed one new token and pass through."""

    def __init__(self, cfg: TinyAlignConfig, lm_dim: int):
        super().__init__()
        self.cfg = cfg
        self.connector = memory_connector(VALUE_DIM, lm_dim, lm_dim)
        self.bank: MemoryBank | None = None
        self._armed: tuple | None = None

    def arm(self, ids: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor], entries: torch.Tensor) -> None:
        if self.bank is None:
            raise ThinklingError("model config 'tinyalign': this policy has no memory bank yet; it is built from "
                                 "the training pairs when `thinkling sft` (or rl) starts")
        if bool((entries >= len(self.bank)).any()):
            raise ThinklingError(f"a prompt's TinyAlign memory slot names entry {int(entries.max())}, but the bank "
                                 f"has {len(self.bank)} entries")
        self._armed = (ids, where, entries)

    def tokens(self, entries: torch.Tensor) -> torch.Tensor:
        """`[N, D]`: bank entries' values through the second connector (the bank itself is fixed)."""
        weight = self.connector[0].weight
        return self.connector(self.bank.values[entries.cpu()].to(weight.device, weight.dtype))

    def inject(self, module, args, output):
        """Forward hook of the input embeddings: the armed call gets its memory tokens."""
        armed = self._armed
        if armed is None or not args or args[0].shape != armed[0].shape or not torch.equal(args[0], armed[0]):
            return None
        self._armed = None
        _, where, entries = armed
        return output.index_put(where, self.tokens(entries).to(output.dtype))


class HFVLMPolicy(HFPolicy):
    """A transformers image-text-to-text model (optionally LoRA-wrapped) with its processor.

    `train_vision=True` lets full fine-tuning train the vision encoder too; under LoRA only the
    adapters (on the language model) train either way."""

    accepts_images = True

    def __init__(self, model: torch.nn.Module, processor: Any, *, chat_template: bool = True,
                 system_prompt: str | None = None, source: dict | None = None, train_vision: bool = False):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ThinklingError(f"{type(processor).__name__} has no tokenizer; a VLM needs its processor")
        super().__init__(model, tokenizer, chat_template=chat_template, system_prompt=system_prompt, source=source)
        self.processor = processor
        self.use_engine = False  # the rollout engine runs text-only Llama layouts
        self.train_vision = train_vision
        if not train_vision and not hasattr(model, "peft_config"):  # under LoRA only the adapters train
            freeze_vision(model)
        config = _base_model(model).config
        ids = {int(getattr(config, k)) for k in ("image_token_id", "image_token_index")
               if getattr(config, k, None) is not None}
        self.image_token_id = ids.pop() if len(ids) == 1 else None  # the token each slot stands for
        self._n_tokens: dict[int, int] = {}  # image handle -> image tokens the processor gives it
        # tokens that stand for pixels: a completion holding one would have no pixels to fill it
        self.media_token_ids = sorted({int(getattr(config, k)) for k in (
            "image_token_id", "image_token_index", "video_token_id", "video_token_index")
            if getattr(config, k, None) is not None})

    @property
    def context_length(self) -> int | None:
        config = _base_model(self.model).config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(cls, name_or_path: str, *, dtype: str | None = None, lora: dict | None = None,
             trust_remote_code: bool = False, chat_template: bool | None = None, system_prompt: str | None = None,
             train_vision: bool | None = None, device: str | None = None, tinyalign: dict | None = None,
             seed: int = 0, **_: Any) -> HFVLMPolicy:
        """Load a local folder, a hub id, or a folder written by `save` (its settings are the
        defaults of arguments left at None). `tinyalign`: add a fresh TinyAlign connector
        (`model.tinyalign`), initialised from `seed`; a saved TinyAlign policy brings its own."""
        added = None if tinyalign is None else TinyAlignConfig.from_mapping(tinyalign)  # before any loading
        path = resolve_model(name_or_path)
        meta_file = Path(path) / "policy.json"
        meta = read_json(meta_file) if meta_file.is_file() else {}
        if meta and meta.get("backend") != BACKEND:
            raise ThinklingError(f"{meta_file}: backend is {meta.get('backend')!r}, not {BACKEND!r}")
        if meta.get("tinyalign") and added is not None:
            raise ThinklingError(f"{path} already holds a TinyAlign connector; load it without model.tinyalign")
        if meta.get("trust_remote_code") and not trust_remote_code:
            raise ThinklingError(f"{meta_file} asks to run the model's own code (trust_remote_code); if you trust "
                                 "it, set model.trust_remote_code: true in the recipe")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(dtype or meta.get("dtype", "float32"), torch.device(device))
        adapters = meta.get("lora")
        if adapters and lora:
            raise ThinklingError(f"{path} already holds LoRA adapters; load it without lora=")
        base = meta["base"] if adapters else name_or_path
        model = _from_pretrained(transformers.AutoModelForImageTextToText, resolve_model(base) if adapters else path,
                                 None, dtype=_check_dtype(dtype), trust_remote_code=trust_remote_code)
        processor = _from_pretrained(transformers.AutoProcessor, path, None, trust_remote_code=trust_remote_code)
        model.to(device)
        if adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        policy = cls.create(model, processor, lora=None if adapters else lora,
                            chat_template=meta.get("chat_template", True) if chat_template is None else chat_template,
                            system_prompt=meta.get("system_prompt") if system_prompt is None else system_prompt,
                            source={"base": base, "trust_remote_code": trust_remote_code},
                            train_vision=meta.get("train_vision", False) if train_vision is None else train_vision,
                            tinyalign=added, seed=seed)
        if adapters:
            policy.lora = adapters
        if meta.get("tinyalign"):
            policy._load_memory(Path(path), TinyAlignConfig.from_mapping(meta["tinyalign"]))
        return policy

    @classmethod
    def create(cls, model: torch.nn.Module, processor: Any, *, lora: dict | None = None,
               tinyalign: TinyAlignConfig | None = None, seed: int = 0, **kwargs: Any) -> HFVLMPolicy:
        """A policy of an in-memory model, LoRA-wrapped (language model only) when `lora` is given,
        with a fresh TinyAlign connector (initialised from `seed`) when `tinyalign` is given."""
        adapters = None
        if lora is not None:
            adapters = lora_config(lora, model)
            model = _apply_lora(model, adapters)
        model.eval()  # peft leaves its wrapper in train mode; trainers switch to train() themselves
        policy = cls(model, processor, **kwargs)
        policy.lora = adapters
        if tinyalign is not None:
            policy._add_memory(tinyalign, seed)
        return policy

    # --------------------------------------------------------------- TinyAlign

    @property
    def memory(self) -> MemoryTokens | None:
        """TinyAlign's second connector and bank, or None (a plain connector)."""
        return getattr(_base_model(self.model), MEMORY_MODULE, None)

    def _add_memory(self, cfg: TinyAlignConfig, seed: int) -> None:
        """Attach a fresh `MemoryTokens` after LoRA wrapping (so it is trained in full, and comes
        last in the parameters: a resumed run's optimizer state lines up) and hook it into the
        input embeddings."""
        base = _base_model(self.model)
        text = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        weight = base.get_input_embeddings().weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            memory = MemoryTokens(cfg, text.hidden_size)
        base.add_module(MEMORY_MODULE, memory.to(weight.device, weight.dtype))
        base.get_input_embeddings().register_forward_hook(memory.inject)

    def _load_memory(self, folder: Path, cfg: TinyAlignConfig) -> None:
        from safetensors.torch import load_file

        self._add_memory(cfg, 0)
        file = folder / CONNECTOR_FILE
        try:
            self.memory.connector.load_state_dict(load_file(str(file), device=str(self.device)))
        except (OSError, RuntimeError) as e:
            raise ThinklingError(f"{file}: cannot load the TinyAlign connector ({e})") from None
        if (folder / BANK_FILE).is_file():
            self.memory.bank = load_bank(folder / BANK_FILE)

    def build_memory(self, pairs: list[tuple[tuple, str, str]]) -> bool:
        """TinyAlign: build the memory bank from training pairs `(images, prompt text, target text)`
        (`tinyalign.build_bank`), unless the policy already has one (a resumed run, or a policy
        trained before): the bank belongs to the weights trained with it. Returns whether it built."""
        memory = self.memory
        if memory is None or memory.bank is not None:
            return False
        memory.bank = build_bank(pairs, memory.cfg)
        return True

    @contextmanager
    def _without_memory(self):
        """The transformers model without TinyAlign's module (saved in files of its own)."""
        base, memory = _base_model(self.model), self.memory
        if memory is not None:
            delattr(base, MEMORY_MODULE)
        try:
            yield
        finally:
            if memory is not None:
                base.add_module(MEMORY_MODULE, memory)

    def save(self, directory: str, *, merge: bool = False) -> None:
        """Weights (or only the LoRA adapters), processor and policy.json (written last, atomically:
        a folder with a policy.json is complete)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        adapters = self.lora is not None and not merge
        if adapters and not self.source.get("base"):
            raise ThinklingError(f"cannot save LoRA adapters to {directory}: the base model has no path; "
                                 "use save(..., merge=True)")
        with self._without_memory():
            if adapters or self.lora is None:
                self.model.save_pretrained(out)
            else:
                copy.deepcopy(self.model).merge_and_unload().save_pretrained(out)
        self.processor.save_pretrained(out)
        memory = self.memory
        if memory is not None:
            from safetensors.torch import save

            state = {k: v.detach().cpu().contiguous() for k, v in memory.connector.state_dict().items()}
            atomic_write_bytes(out / CONNECTOR_FILE, save(state))
            if memory.bank is not None:
                memory.bank.save(out / BANK_FILE)
        meta = {
            "backend": BACKEND,
            "dtype": _dtype_name(self.model),
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "trust_remote_code": bool(self.source.get("trust_remote_code")),
            "train_vision": self.train_vision,
            "lora": self.lora if adapters else None,
            "base": _portable(self.source.get("base")) if adapters else None,
            "tinyalign": asdict(memory.cfg) if memory is not None else None,
        }
        atomic_write_text(out / "policy.json", json.dumps(meta, indent=2) + "\n")

    def use_vllm(self, **engine_kwargs):
        raise ThinklingError("model.generator: vllm is not supported for vision-language models (backend hf_vlm)")

    # -------------------------------------------------------------- tokenizing

    def prompt_text(self, prompt: str, n_images: int = 0) -> str:
        """The prompt as the model expects it, with one image placeholder per image."""
        template = getattr(self.processor, "chat_template", None)
        if self.chat_template and template:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
            messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}] \
                if self.system_prompt else []
            messages.append({"role": "user", "content": content})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self.processor, "image_token", None)
        if n_images and token is None:
            raise ThinklingError(f"{type(self.processor).__name__} has neither a chat template nor an image token")
        bos = self.tokenizer.bos_token or ""
        return bos + (token or "") * n_images + prompt

    def encode_prompt(self, prompt: str, images: Sequence = ()) -> list[int]:
        """Prompt ids with each image's placeholder expanded into the model's image tokens, which
        are then written as that image's slot ids (`models.images`)."""
        handles = [image_store.register(image) for image in images]
        if handles and self.image_token_id is None:
            raise ThinklingError(f"{type(_base_model(self.model)).__name__}: its config names no single image "
                                 "token id (image_token_id / image_token_index)")
        out = self.processor(text=[self.prompt_text(prompt, len(handles))],
                             images=[self._pictures(handles)] if handles else None, add_special_tokens=False)
        ids = out["input_ids"][0]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not handles:
            return ids
        # which image each image token belongs to: the processor expands them in order
        owners = [h for h in handles for _ in range(self._image_tokens(h))]
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != len(owners):
            raise ThinklingError(f"{type(self.processor).__name__}: {len(positions)} image tokens in the prompt, "
                                 f"expected {len(owners)} for its {len(handles)} image(s)")
        j = 0
        for k, (i, h) in enumerate(zip(positions, owners)):
            j = j + 1 if k and owners[k - 1] == h and j + 1 < self._n_tokens[h] else 0
            ids[i] = image_store.slot_id(h, j)
        memory = self.memory
        if memory is not None:  # TinyAlign: the retrieved entries, right after the last image token
            last, n = handles[-1], self._n_tokens[handles[-1]]
            entries = retrieve(memory.bank, memory.cfg.top_k, handles, prompt)
            ids[positions[-1] + 1 : positions[-1] + 1] = [image_store.slot_id(last, n + e) for e in entries]
        return ids

    def _pictures(self, handles: Sequence[int]) -> list:
        """The stored images as PIL RGB images (what the processor sees, at encoding and at forward)."""
        from PIL import Image

        return [Image.fromarray(image_store.pixels(h)) for h in handles]

    def _image_tokens(self, handle: int) -> int:
        """How many image tokens the processor expands one image into (depends on its size)."""
        n = self._n_tokens.get(handle)
        if n is None:
            out = self.processor(text=[self.prompt_text("", 1)], images=[self._pictures([handle])],
                                 add_special_tokens=False)
            ids = out["input_ids"][0]
            n = self._n_tokens[handle] = int((torch.as_tensor(ids) == self.image_token_id).sum())
        return n

    # ------------------------------------------------------------------- model

    def model_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's inputs for ids that may hold image slots: the slots become the image token
        id, and the rows' images (each starts at its slot 0) become the processor's pixel inputs.
        Models with multimodal rotary positions (Qwen2-VL) also get each token's modality
        (`mm_token_type_ids`), which their processor derives from the ids."""
        slots = input_ids < 0
        if not bool(slots.any()):
            return {"input_ids": input_ids.to(self.device)}
        handle, j = image_store.split_slot(input_ids)
        starts = slots & (j == 0)
        rows = [handle[b][starts[b]].tolist() for b in range(input_ids.shape[0])]
        n = torch.zeros_like(input_ids)  # image tokens of each slot's image; slots beyond are TinyAlign's
        for h in torch.unique(handle[slots]).tolist():
            n[slots & (handle == h)] = self._image_tokens(h)
        memory = slots & (j >= n)
        ids = torch.where(slots, torch.full_like(input_ids, self.image_token_id), input_ids)
        if bool(memory.any()):
            if self.memory is None:
                raise ThinklingError("a prompt holds TinyAlign memory slots, but this model has no TinyAlign "
                                     "connector (model.tinyalign)")
            ids = torch.where(memory, torch.full_like(ids, self.memory_placeholder), ids).to(self.device)
            self.memory.arm(ids, tuple(w.to(self.device) for w in memory.nonzero(as_tuple=True)), (j - n)[memory])
        out = self.processor.image_processor(images=[self._pictures(r) for r in rows], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in out.items() if isinstance(v, torch.Tensor)}
        if "mm_token_type_ids" in getattr(self.processor, "model_input_names", ()):
            types = self.processor.create_mm_token_type_ids(ids.tolist())
            inputs["mm_token_type_ids"] = torch.tensor(types, dtype=torch.long, device=self.device)
        return {"input_ids": ids.to(self.device), **inputs}

    @property
    def memory_placeholder(self) -> int:
        """The text token a TinyAlign memory slot is given before its embedding is replaced: the bos
        (else eos) token, never the image token (the model would look for its features) nor padding."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eos_id

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_from: int = 0) -> torch.Tensor:
        """Logits of positions `keep_from..T-1` of a right-padded batch whose ids may hold image
        slots. Positions are left to the model: right padding keeps the real tokens' positions,
        and Qwen2-VL computes its own 3-D (time, height, width) positions from the image grid."""
        out = self.model(attention_mask=attention_mask, use_cache=False,
                         logits_to_keep=input_ids.shape[1] - keep_from if keep_from > 0 else 0,
                         **self.model_inputs(input_ids))
        return out.logits

    def generation_options(self) -> dict[str, Any]:
        return {"suppress_tokens": self.media_token_ids} if self.media_token_ids else {}

    def output_head(self):
        return None  # image features enter mid-sequence: no hidden-state-only shortcut

    def prefix_sharing(self) -> bool:
        return False


def connector_module_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the vision -> text connector(s) (LLaVA's `multi_modal_projector`,
    Idefics3's `connector`, Qwen2-VL's `visual.merger`)."""
    return _find(_base_model(model), CONNECTOR_MODULES)


def lora_config(lora: Mapping, model: torch.nn.Module) -> dict:
    """LoRA settings with defaults; targets default to the language model's projections
    (`language_lora_targets`). Targets given by the user are checked to be language layers.
    The connector is trained in full beside the adapters and saved with them (peft's
    `modules_to_save`), as full fine-tuning trains it: a connector trained from scratch (the
    composite VLM, `models.composite_vlm`) must learn, and LLaVA's own LoRA recipe trains it too."""
    unknown = set(lora) - set(LORA_DEFAULTS)
    if unknown:
        raise ThinklingError(f"unknown lora key {sorted(unknown)[0]!r}; allowed: {', '.join(LORA_DEFAULTS)}")
    cfg = {**LORA_DEFAULTS, **lora}
    allowed = language_lora_targets(model)
    if cfg["target_modules"] is None:
        cfg["target_modules"] = allowed
    else:  # short names (q_proj) mean those layers of the language model only
        wanted = set(cfg["target_modules"])
        cfg["target_modules"] = [n for n in allowed if n.rsplit(".", 1)[-1] in wanted or n in wanted]
        if not cfg["target_modules"]:
            raise ThinklingError(f"lora 'target_modules': none of {sorted(wanted)} is a linear layer of the "
                                 "language model")
    cfg["modules_to_save"] = connector_module_names(model) or None
    return cfg
