"""A composite vision-language model built offline: a small vision encoder trained from scratch on
`shapes` pictures + a fresh connector + a real pretrained language model (SmolLM2 by default).

Why: no real VLM checkpoint is available offline, and the tiny VLM's character LM is too small to
say anything about a real language model. LLaVA's recipe needs only a vision encoder whose patch
features carry what the pictures show, a connector, and a language model; this module makes each
part locally and saves the result as a transformers `LlavaForConditionalGeneration` folder that
`model.backend: hf_vlm` loads like any other VLM (LoRA on the language model, vision frozen, the
connector trained).

1. `train_encoder`: a SigLIP vision transformer (no class token, so every patch is an image token)
   trained on a cheap supervised objective the task generator knows exactly: for each patch (one
   patch per cell of the 3x3 grid at the default 36 px / 12 px patches), the colour and the form of
   the shape in it, or "empty". Its features then name what is where.
2. `assemble`: `LlavaForConditionalGeneration` with that encoder (frozen later), a fresh two-layer
   MLP projector, and the language model's weights copied in; a `LlavaProcessor` with a SigLIP
   image processor at the encoder's size, the LM's tokenizer plus an `<image>` token, and a ChatML
   template that takes image parts.
3. `build_composite`: both, written to a folder with a `policy.json` (backend hf_vlm), so the
   untrained start is also a policy `thinkling eval --model` takes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from thinkling.errors import ThinklingError
from thinkling.files import atomic_write_text, read_json, staged_folder
from thinkling.models.registry import resolve_model
from thinkling.tasks.shapes import CELLS, COLOURS, FORMS, ShapesTask

IMAGE_TOKEN = "<image>"
# ChatML (SmolLM2's format) whose message content may be a list of {"type": "image"} / {"type": "text"}.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}" + IMAGE_TOKEN + "{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ENCODER_DEFAULTS = {"image_size": 36, "patch_size": 12, "hidden_size": 96, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "intermediate_size": 192}
N_CLASSES = 1 + len(COLOURS)  # "empty" + 4 colours; likewise 1 + 4 forms


def cell_targets(scene, grid: int) -> tuple[list[int], list[int]]:
    """Per-patch (colour, form) class ids of a scene of (colour, form, cell) on a `grid` x `grid`
    patch layout (0 = nothing). `grid` is a multiple of 3, so each cell is a block of patches;
    a shape's labels go to the patch at its cell's centre."""
    if grid % 3:
        raise ThinklingError(f"composite VLM encoder: image_size / patch_size must be a multiple of 3, got {grid}")
    colour, form = [0] * grid * grid, [0] * grid * grid
    step = grid // 3
    for c, f, where in scene:
        i = CELLS.index(where)
        row, col = (i // 3) * step + step // 2, (i % 3) * step + step // 2
        colour[row * grid + col] = 1 + list(COLOURS).index(c)
        form[row * grid + col] = 1 + FORMS.index(f)
    return colour, form


def image_processor(image_size: int):
    """What turns pictures into the encoder's input, at training and inside the VLM alike (the
    Pillow-backed SigLIP processor: the default one wants torchvision, not a dependency here)."""
    cls = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)
    return cls(size={"height": image_size, "width": image_size})


class _Probe(torch.nn.Module):
    """The encoder with per-patch colour / form heads on the features LLaVA reads (last layer)."""

    def __init__(self, config: transformers.SiglipVisionConfig):
        super().__init__()
        self.vision = transformers.SiglipVisionModel(config)
        self.head = torch.nn.Linear(config.hidden_size, 2 * N_CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
        return self.head(hidden).view(*hidden.shape[:2], 2, N_CLASSES)


def _scene_data(n: int, seed: int, image_size: int, grid: int, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels [n, 3, S, S] and targets [n, grid^2, 2] of `n` shapes pictures with 1..9 shapes."""
    problems = ShapesTask(image_size=image_size).problems(n, seed, difficulty=list(range(1, len(CELLS) + 1)))
    pixels = processor(images=[p.images[0] for p in problems], return_tensors="pt")["pixel_values"]
    targets = torch.tensor([list(zip(*cell_targets(p.meta["scene"], grid))) for p in problems])
    return pixels, targets


def probe_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per-patch colour / form accuracy, and the share of pictures whose every patch is right."""
    right = logits.argmax(-1) == targets  # [n, P, 2]
    return {"colour": float(right[..., 0].float().mean()), "form": float(right[..., 1].float().mean()),
            "scene": float(right.all(-1).all(-1).float().mean())}


def train_encoder(*, steps: int = 600, batch_size: int = 64, lr: float = 2e-3, n_train: int = 6000,
                  n_eval: int = 500, seed: int = 0, log=None, **config: Any):
    """A SigLIP vision encoder trained from scratch to name the colour and form in each patch of
    `shapes` pictures. Returns (SiglipVisionModel, metrics)."""
    cfg = {**ENCODER_DEFAULTS, **config}
    unknown = set(cfg) - set(ENCODER_DEFAULTS)
    if unknown:
        raise ThinklingError(f"composite VLM encoder: unknown setting {sorted(unknown)[0]!r}")
    if cfg["image_size"] % cfg["patch_size"]:
        raise ThinklingError(f"composite VLM encoder: image_size {cfg['image_size']} is not a multiple of "
                             f"patch_size {cfg['patch_size']}")
    grid = cfg["image_size"] // cfg["patch_size"]
    if grid % 3:
        raise ThinklingError(f"composite VLM encoder: image_size / patch_size = {grid} patches per side; it must be "
                             "a multiple of 3 (the shapes grid is 3x3)")
    torch.manual_seed(seed)
    config = transformers.SiglipVisionConfig(**cfg, num_channels=3, vision_use_head=False)
    probe = _Probe(config)
    processor = image_processor(cfg["image_size"])
    start = time.perf_counter()
    x, y = _scene_data(n_train, seed, cfg["image_size"], grid, processor)
    x_eval, y_eval = _scene_data(n_eval, seed + 10_000, cfg["image_size"], grid, processor)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    rng = torch.Generator().manual_seed(seed)
    probe.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warmup, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x), (batch_size,), generator=rng)
        logits = probe(x[idx])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, N_CLASSES), y[idx].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log and (step + 1) % max(1, steps // 10) == 0:
            log(f"encoder step {step + 1}/{steps}  loss {loss.item():.4f}")
    probe.eval()
    with torch.no_grad():
        held_out = probe_accuracy(torch.cat([probe(x_eval[i:i + 256]) for i in range(0, len(x_eval), 256)]), y_eval)
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "n_train": n_train, "n_eval": n_eval, "seed": seed,
               "final_loss": round(loss.item(), 5), "held_out": held_out, "config": cfg,
               "seconds": round(time.perf_counter() - start, 1)}
    return probe.vision, metrics


def load_encoder(path: str | Path) -> transformers.SiglipVisionModel:
    """An encoder saved by `build_composite` (its `encoder/` folder) or any SigLIP vision folder."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ThinklingError(f"{folder}: no encoder checkpoint (config.json + *.safetensors); "
                             "build one with thinkling vlm-build, or leave --encoder out to train one")
    try:
        return transformers.SiglipVisionModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ThinklingError(f"{folder}: not a SigLIP vision encoder ({str(e).splitlines()[0]})") from e


def _tokenizer_with_image_token(lm_path: str):
    tokenizer = transformers.AutoTokenizer.from_pretrained(lm_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def assemble(encoder: transformers.SiglipVisionModel, language_model: transformers.PreTrainedModel, tokenizer):
    """(LlavaForConditionalGeneration, LlavaProcessor) of a trained encoder and a causal LM whose
    tokenizer already holds `IMAGE_TOKEN`; the projector is fresh. Text-only prompts give the
    language model's own logits (the embedding table only grows by the image token's row)."""
    vision_cfg = encoder.config
    text_cfg = language_model.config
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.LlavaConfig(
            vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(), image_token_index=image_id,
            vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
            tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)))
        model = transformers.LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(encoder.state_dict())
    model.model.language_model.load_state_dict(language_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    tokenizer.image_token = IMAGE_TOKEN
    processor = transformers.LlavaProcessor(
        image_processor=image_processor(vision_cfg.image_size), tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN)
    return model.eval(), processor


def build_composite(out: str | Path, *, lm: str = "smollm2-135m", encoder: str | None = None,
                    encoder_settings: dict | None = None, log=None) -> dict:
    """Write the composite VLM to `out` (atomically: a temporary folder renamed at the end):
    the LLaVA model and processor, `encoder/` (the trained encoder, reusable with `encoder=`),
    `build.json` (how it was made, the encoder's held-out accuracy) and `policy.json`."""
    target = Path(out)
    if target.exists():
        raise ThinklingError(f"{target}: already exists; choose a new --out folder")
    start = time.perf_counter()
    lm_path = resolve_model(lm)  # a bad name fails before the encoder trains
    if encoder is not None:
        if encoder_settings:
            raise ThinklingError("--encoder reuses a trained encoder; its training settings do not apply")
        vision = load_encoder(encoder)
        encoder_file = Path(encoder) / "encoder.json"
        encoder_metrics = read_json(encoder_file) if encoder_file.is_file() else {"from": str(encoder)}
    else:
        vision, encoder_metrics = train_encoder(log=log, **(encoder_settings or {}))
    language_model = transformers.AutoModelForCausalLM.from_pretrained(lm_path, dtype=torch.float32)
    model, processor = assemble(vision, language_model, _tokenizer_with_image_token(lm_path))
    with staged_folder(target) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model folder is an ordinary output
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        vision.save_pretrained(tmp / "encoder")
        atomic_write_text(tmp / "encoder" / "encoder.json", json.dumps(encoder_metrics, indent=2) + "\n")
        info = {"language_model": lm, "encoder": encoder_metrics, "image_tokens": _n_image_tokens(vision.config),
                "parameters": {"vision": _count(model.model.vision_tower),
                               "projector": _count(model.model.multi_modal_projector),
                               "language_model": _count(model.model.language_model) + _count_untied(model)},
                "seconds": round(time.perf_counter() - start, 1)}
        atomic_write_text(tmp / "build.json", json.dumps(info, indent=2) + "\n")
        meta = {"backend": "hf_vlm", "dtype": "float32", "chat_template": True, "system_prompt": None,
                "trust_remote_code": False, "train_vision": False, "lora": None, "base": None}
        atomic_write_text(tmp / "policy.json", json.dumps(meta, indent=2) + "\n")
    return info


def _n_image_tokens(config) -> int:
    return (config.image_size // config.patch_size) ** 2


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_untied(model) -> int:
    """The output layer's parameters when it is not the input embedding table."""
    head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return 0 if head.data_ptr() == table.data_ptr() else head.numel()

