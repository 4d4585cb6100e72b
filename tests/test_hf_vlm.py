"""HFVLMPolicy on tiny random LLaVA, Idefics3 (SmolVLM's architecture) and Qwen2-VL models, with
processors and a char-level tokenizer built here (no downloads).

Qwen2-VL's processor insists on a video processor, which needs torchvision (not installed here):
the test builds it without one (images only), so it cannot be saved and reloaded by
`AutoProcessor`; its save/load round trip is not tested.
"""

from __future__ import annotations

import string
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from thinkling.errors import ThinklingError  # noqa: E402
from thinkling.models import load_policy  # noqa: E402
from thinkling.models.base import SamplingParams, pad_batch  # noqa: E402
from thinkling.models.hf_vlm import (  # noqa: E402
    HFVLMPolicy,
    language_module_name,
    vision_module_names,
)
from thinkling.models.logprobs import masked_token_logprobs  # noqa: E402
from thinkling.train.sft import collate, make_example, sft_loss  # noqa: E402

IMAGE_SPECIALS = ["<image>", "<fake_token_around_image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 3) for j in range(1, 3)] + [
    "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<unk>"] + IMAGE_SPECIALS
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
IMAGE_ID = VOCAB["<image>"]
# ChatML whose content may be a list of {"type": "image"} / {"type": "text"} parts.
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
        "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=3, pad_token_id=0)
FAMILIES = ["llava", "idefics3", "qwen2vl"]
SAVABLE = ["llava", "idefics3"]


def make_tokenizer(image_token="<image>"):
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": image_token})


def make_vlm(family: str, seed: int = 0):
    """(model, processor) of a tiny random VLM of `family`."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "llava":
            config = transformers.LlavaConfig(
                text_config=transformers.LlamaConfig(**TEXT),
                vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=16, patch_size=8),
                image_token_index=IMAGE_ID, vision_feature_layer=-1)
            model = transformers.LlavaForConditionalGeneration(config)
            images = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
            processor = transformers.LlavaProcessor(image_processor=images, tokenizer=make_tokenizer(), patch_size=8,
                                                    vision_feature_select_strategy="default", chat_template=CHAT,
                                                    num_additional_image_tokens=1)
        elif family == "idefics3":
            config = transformers.Idefics3Config(
                text_config=transformers.LlamaConfig(**TEXT),
                vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=16, patch_size=8),
                image_token_id=IMAGE_ID, scale_factor=2)
            model = transformers.Idefics3ForConditionalGeneration(config)
            images = transformers.Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
            processor = transformers.Idefics3Processor(image_processor=images, tokenizer=make_tokenizer(),
                                                       image_seq_len=1, chat_template=CHAT)
        else:
            config = transformers.Qwen2VLConfig(
                text_config=dict(model_type="qwen2_vl_text", **TEXT,
                                 rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]}),
                vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                                   spatial_merge_size=2, temporal_patch_size=2),
                image_token_id=VOCAB["<|image_pad|>"], video_token_id=VOCAB["<|video_pad|>"],
                vision_start_token_id=VOCAB["<|vision_start|>"])
            model = transformers.Qwen2VLForConditionalGeneration(config)
            images = transformers.Qwen2VLImageProcessor(min_pixels=64, max_pixels=256, patch_size=4, merge_size=2,
                                                        temporal_patch_size=2)
            template = CHAT.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
            with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class", lambda *a: None):
                processor = transformers.Qwen2VLProcessor(image_processor=images,
                                                          tokenizer=make_tokenizer("<|image_pad|>"),
                                                          video_processor=None, chat_template=template)
    return model.eval(), processor


def image(seed: int, size=(30, 40)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def chars(text):
    return [VOCAB[c] for c in text]


@pytest.fixture(params=FAMILIES)
def policy(request):
    return HFVLMPolicy(*make_vlm(request.param))


def prompts_and_images(policy):
    """Three prompts: one image, two images of other sizes, none."""
    images = [[image(1)], [image(2, (50, 20)), image(3, (16, 16))], []]
    texts = ["What is it?", "Compare.", "No picture"]
    return [policy.encode_prompt(t, im) for t, im in zip(texts, images)], images


def test_prompt_holds_the_image_tokens(policy):
    one = policy.encode_prompt("Hi", [image(1)])
    two = policy.encode_prompt("Hi", [image(1), image(1)])
    none = policy.encode_prompt("Hi")
    (image_id,) = policy.image_token_ids
    n = one.count(image_id)
    assert n > 0 and two.count(image_id) == 2 * n and image_id not in none
    assert policy.decode(none).endswith("assistant\n") and "Hi" in policy.decode(none)


def test_batched_greedy_equals_one_prompt_at_a_time(policy):
    prompts, images = prompts_and_images(policy)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    batched = policy.generate(prompts, params, images)
    alone = [policy.generate([p], params, [im])[0] for p, im in zip(prompts, images)]
    assert batched == alone
    assert all(len(c) > 0 for c in batched)
    # the images matter: the same prompt with another image is a different forward
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        a = policy.logits(ids, torch.ones_like(ids), images=[images[0]])
        b = policy.logits(ids, torch.ones_like(ids), images=[[image(9)]])
    assert not torch.allclose(a, b)


def processor_inputs(policy, ids, images):
    """The vision inputs the processor itself makes for one row (the reference for the policy's)."""
    if not images:
        return {}
    out = policy.processor(text=[policy.prompt_text("x", len(images))], images=[images], return_tensors="pt")
    inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in out:
        inputs["mm_token_type_ids"] = torch.tensor(policy.processor.create_mm_token_type_ids(ids.tolist()))
    return inputs


def test_completion_logprobs_equal_a_manual_forward(policy):
    prompts, images = prompts_and_images(policy)
    completions = [chars("ab") + [policy.eos_id], chars("xyz"), chars("q")]
    got = policy.completion_logprobs(prompts, completions, images)
    for p, c, im, row in zip(prompts, completions, images, got):
        # one row alone through the processor's own inputs and the bare transformers model
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = policy.model(input_ids=ids, **processor_inputs(policy, ids, im)).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        want = [logp[len(p) - 1 + i, t].item() for i, t in enumerate(c)]
        assert row == pytest.approx(want, abs=1e-5)


def test_loss_mask_covers_only_the_completion(policy):
    prompts, images = prompts_and_images(policy)
    completions = [chars("ab") + [policy.eos_id], chars("xyz"), chars("q")]
    ids, attention = pad_batch([p + c for p, c in zip(prompts, completions)], policy.pad_id)
    mask = policy.completion_mask([len(p) for p in prompts], ids, attention)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        trained = mask[b].nonzero().flatten().tolist()
        assert trained == list(range(len(p) - 1, len(p) - 1 + len(c)))  # position t predicts token t + 1
        assert not torch.isin(ids[b, 1:][mask[b]], torch.tensor(sorted(policy.image_token_ids))).any()
    # the SFT examples of the shared trainer agree: zero weight on every prompt and image token
    examples = [make_example(policy, p, "ab") for p in prompts]
    for e, p in zip(examples, prompts):
        assert all(w == 0 for w in e.weights[: len(p)]) and all(w == 1 for w in e.weights[len(p) :])
        assert all(w == 0 for t, w in zip(e.ids, e.weights) if t in policy.image_token_ids)
    ids, attention, weights = collate(examples, policy.pad_id)
    with policy.using_images(images):
        loss = sft_loss(policy, ids, attention, weights)
    manual = []
    for e, im in zip(examples, images):
        x = torch.tensor([e.ids])
        logp = torch.log_softmax(policy.model(input_ids=x, **processor_inputs(policy, x, im)).logits[0, :-1].float(), -1)
        manual += [-logp[t, e.ids[t + 1]] for t in range(len(e.ids) - 1) if e.weights[t + 1] > 0]
    assert loss.item() == pytest.approx(torch.stack(manual).mean().item(), abs=1e-5)


def test_images_without_image_tokens_is_an_error(policy):
    prompts, images = prompts_and_images(policy)
    ids, attention = pad_batch(prompts[2:], policy.pad_id)
    with pytest.raises(ThinklingError, match="row 0: 1 images"):
        policy.logits(ids, attention, images=[[image(1)]])
    with pytest.raises(ThinklingError, match="1 image lists for 2 rows"):
        policy.logits(*pad_batch(prompts[:2], policy.pad_id), images=[images[0]])
    with pytest.raises(ThinklingError, match="image lists for"):
        policy.vision_inputs(torch.zeros(2, 3, dtype=torch.long), [[image(1)]])


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_language_only_and_vision_frozen(family, tmp_path):
    policy = HFVLMPolicy.create(*make_vlm(family), lora={"r": 4, "alpha": 8, "dropout": 0.0})
    language = language_module_name(policy.model)
    vision = vision_module_names(policy.model)
    assert vision
    lora_names = [n for n, _ in policy.model.named_parameters() if "lora_" in n]
    assert lora_names and all(f".{language}." in n for n in lora_names)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_names)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    _one_step(policy)
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_A" in n for n in changed)  # lora_B starts at zero; A moves once B has moved


@pytest.mark.parametrize("family", SAVABLE)
def test_lora_adapters_save_and_load(family, tmp_path):
    model, processor = make_vlm(family)
    HFVLMPolicy(model, processor).save(str(tmp_path / "base"))
    policy = HFVLMPolicy.load(str(tmp_path / "base"), lora={"r": 4, "alpha": 8, "dropout": 0.0})
    _one_step(policy)
    policy.save(str(tmp_path / "adapters"))
    assert not (tmp_path / "adapters" / "model.safetensors").exists()  # adapters only
    again = load_policy(str(tmp_path / "adapters"))
    assert isinstance(again, HFVLMPolicy) and again.lora is not None
    assert {n for n, p in again.model.named_parameters() if p.requires_grad} == \
        {n for n, p in policy.model.named_parameters() if p.requires_grad}
    prompts, images = prompts_and_images(policy)
    ids, attention = pad_batch(prompts, policy.pad_id)
    with torch.no_grad():
        assert torch.allclose(policy.logits(ids, attention, images=images),
                              again.logits(ids, attention, images=images), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_keeps_the_vision_tower_frozen(family, tmp_path):
    policy = HFVLMPolicy(*make_vlm(family))
    vision = vision_module_names(policy.model)
    frozen = {n for n, p in policy.model.named_parameters() if not p.requires_grad}
    in_vision = {n for n, _ in policy.model.named_parameters() if any(n.startswith(v + ".") for v in vision)}
    assert frozen and frozen == {n for n in in_vision if ".merger." not in n}  # Qwen2-VL's connector trains
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    _one_step(policy)
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not changed & frozen
    assert any("connector" in n or "projector" in n or "merger" in n for n in changed)  # the connector trains
    if family not in SAVABLE:
        return
    policy.save(str(tmp_path / "full"))
    again = load_policy(str(tmp_path / "full"))
    assert again.lora is None and not again.train_vision
    assert all(torch.equal(p, dict(again.model.named_parameters())[n]) for n, p in policy.model.named_parameters())
    assert not any(p.requires_grad for n, p in again.model.named_parameters() if n in frozen)


def _one_step(policy):
    """Two SGD steps of the SFT loss on a batch of rows with and without images."""
    prompts, images = prompts_and_images(policy)
    examples = [make_example(policy, p, "ok") for p in prompts]
    ids, attention, weights = collate(examples, policy.pad_id)
    policy.model.train()
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero: A gets a gradient once B has moved
        optimizer.zero_grad()
        with policy.using_images(images):
            sft_loss(policy, ids, attention, weights).backward()
        optimizer.step()
    policy.model.eval()


def test_masked_logprobs_see_the_bound_images(policy):
    prompts, images = prompts_and_images(policy)
    ids, attention = pad_batch([p + chars("ab") for p in prompts], policy.pad_id)
    mask = policy.completion_mask([len(p) for p in prompts], ids, attention)
    with torch.no_grad(), policy.using_images(images):
        bound, _ = masked_token_logprobs(policy, ids, attention, mask)
    with torch.no_grad():
        direct = policy.logits(ids, attention, images=images).float()
    logp = torch.log_softmax(direct[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(bound, torch.where(mask, logp, 0.0), atol=1e-5)
    assert policy._images is None  # the binding ends with the block
