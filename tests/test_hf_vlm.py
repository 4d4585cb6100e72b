"""HFVLMPolicy on tiny random LLaVA, Idefics3 (SmolVLM's architecture) and Qwen2-VL models, with
processors and a char-level tokenizer built here (no downloads). Images ride in the prompt ids
as slot ids (`models.images`), so the shared SFT / GRPO / BREAD code and `thinkling rl` take them.

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

from thinkling.cli import main  # noqa: E402
from thinkling.config import RLConfig  # noqa: E402
from thinkling.errors import ThinklingError  # noqa: E402
from thinkling.models import images as image_store  # noqa: E402
from thinkling.models import load_policy  # noqa: E402
from thinkling.models.base import SamplingParams, pad_batch  # noqa: E402
from thinkling.models.hf_vlm import (  # noqa: E402
    HFVLMPolicy,
    connector_module_names,
    language_module_name,
    vision_module_names,
)
from thinkling.models.logprobs import masked_token_logprobs  # noqa: E402
from thinkling.rollout.bread import anchor_failed_groups  # noqa: E402
from thinkling.rollout.groups import sample_groups  # noqa: E402
from thinkling.rollout.prompts import anchor_text, prompt_ids  # noqa: E402
from thinkling.tasks import get_task  # noqa: E402
from thinkling.train.rl import build_batch, minibatch_loss, resolve_knobs  # noqa: E402
from thinkling.train.sft import collate, make_example, sft_examples, sft_loss  # noqa: E402

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


def unslotted(policy, ids):
    """Ids with every image slot back to the model's image token (what the processor itself writes)."""
    return [policy.image_token_id if t < 0 else t for t in ids]


def test_prompt_holds_one_slot_per_image_token(policy):
    one = policy.encode_prompt("Hi", [image(1)])
    two = policy.encode_prompt("Hi", [image(1), image(1)])
    none = policy.encode_prompt("Hi")
    h = image_store.register(image(1))
    n = sum(t < 0 for t in one)
    assert n > 0 and [t for t in one if t < 0] == image_store.slot_ids(h, n)
    assert [t for t in two if t < 0] == image_store.slot_ids(h, n) * 2
    assert policy.image_token_id not in one and all(t >= 0 for t in none)
    assert policy.decode(none).endswith("assistant\n") and "Hi" in policy.decode(none)
    # with the slots back to image tokens, the ids are exactly the processor's
    out = policy.processor(text=[policy.prompt_text("Hi", 2)], images=[[image(1), image(1)]], add_special_tokens=False)
    assert unslotted(policy, two) == list(out["input_ids"][0])


def test_batched_greedy_equals_one_prompt_at_a_time(policy):
    prompts, _ = prompts_and_images(policy)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    batched = policy.generate(prompts, params)
    alone = [policy.generate([p], params)[0] for p in prompts]
    assert batched == alone
    assert all(len(c) > 0 for c in batched)
    # the images matter: the same text with another image is a different forward
    other = policy.encode_prompt("What is it?", [image(9)])
    assert other != prompts[0] and len(other) == len(prompts[0])
    with torch.no_grad():
        a, b = (policy.logits(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long)) for p in (prompts[0], other))
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


def test_sft_loss_equals_a_manual_forward_of_the_completion(policy):
    """The shared SFT loss on a batch of image and text rows: completion tokens only, each scored
    as the bare transformers model scores it from the processor's own inputs."""
    prompts, images = prompts_and_images(policy)
    examples = [make_example(policy, p, "ab") for p in prompts]
    for e, p in zip(examples, prompts):
        assert all(w == 0 for w in e.weights[: len(p)]) and all(w == 1 for w in e.weights[len(p) :])
    ids, attention, weights = collate(examples, policy.pad_id)
    assert torch.all(weights[ids < 0] == 0)
    loss = sft_loss(policy, ids, attention, weights)
    manual = []
    for e, im in zip(examples, images):
        x = torch.tensor([unslotted(policy, e.ids)])
        logp = torch.log_softmax(policy.model(input_ids=x, **processor_inputs(policy, x, im)).logits[0, :-1].float(), -1)
        manual += [-logp[t, e.ids[t + 1]] for t in range(len(e.ids) - 1) if e.weights[t + 1] > 0]
    assert loss.item() == pytest.approx(torch.stack(manual).mean().item(), abs=1e-5)


def test_unknown_image_handle_is_an_error(policy):
    prompts, _ = prompts_and_images(policy)
    h = image_store.register(image(1))
    bad = [image_store.slot_id(h + 10**6, 0) if t < 0 else t for t in prompts[0]]
    with pytest.raises(ThinklingError, match="unknown in this process"):
        policy.logits(torch.tensor([bad]), torch.ones(1, len(bad), dtype=torch.long))


def _shapes(n, seed=0, difficulty=(2,)):
    return get_task("shapes").problems(n, seed, list(difficulty))


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_examples_of_image_problems_train_only_completion_tokens(family):
    policy = HFVLMPolicy(*make_vlm(family))
    task = get_task("shapes")
    problems = _shapes(2)
    chain = get_task("chain").problems(1, 0, 1)  # a text-only row in the same batch
    examples = sft_examples(policy, task, problems) + sft_examples(policy, get_task("chain"), chain)
    for e, p in zip(examples, problems + chain):
        n = len(prompt_ids(policy, p))
        assert all(w == 0 for w in e.weights[:n]) and all(w == 1 for w in e.weights[n:])
        assert any(t < 0 for t in e.ids[:n]) == bool(p.images) and all(t >= 0 for t in e.ids[n:])
    ids, mask, weights = collate(examples, policy.pad_id)
    policy.model.train()
    loss = sft_loss(policy, ids, mask, weights)
    loss.backward()
    # the image is context the loss reaches: the trainable connector gets a gradient
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.grad is not None}
    assert any(("projector" in n or "connector" in n or "merger" in n) and g.abs().sum() > 0 for n, g in grads.items())
    assert not any(p.grad is not None for p in policy.model.parameters() if not p.requires_grad)
    # prompt and image positions never become targets
    logp, _ = masked_token_logprobs(policy, ids, mask, weights[:, 1:] > 0)
    assert torch.all(logp[weights[:, 1:] == 0] == 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_step_and_bread_anchor_on_image_prompts(family):
    policy = HFVLMPolicy.create(*make_vlm(family), lora={"r": 4, "alpha": 8, "dropout": 0.0})
    task = get_task("shapes")
    problems = _shapes(2, difficulty=(3,))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1)
    groups = sample_groups(policy, task, [(p, None, 0) for p in problems], 3, params)
    assert all(g.prefix == prompt_ids(policy, g.problem) and len(g.completions) == 3 for g in groups)
    assert all(any(t < 0 for t in g.prefix) for g in groups)
    # a random model would sample image / video tokens; they have no pixels and are banned
    assert not {t for g in groups for c in g.completions for t in c.ids} & set(policy.media_token_ids)
    knobs = resolve_knobs(RLConfig(algorithm="grpo"))
    batch = build_batch(groups, torch.tensor([[1.0, -0.5, -0.5], [0.5, 0.5, -1.0]]), policy.pad_id)
    assert torch.all(batch.loss_mask[batch.ids[:, 1:] < 0] == 0) and bool((batch.ids < 0).any())
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    policy.model.train()
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero: A moves once B has
        optimizer.zero_grad()
        minibatch_loss(policy, batch, slice(None), knobs, max_len=8)[0].backward()
        optimizer.step()
    policy.model.eval()
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable and any("lora_A" in n for n in changed)
    # BREAD: a random model fails; the anchor is prompt (with its image) + the first k expert steps
    failed = [g for g in groups if not g.has_success]
    assert failed
    _, stats = anchor_failed_groups(policy, task, failed, 2, lambda r: params, 1, None)
    assert stats["bread/probe_groups"] >= 1
    (branch,) = sample_groups(policy, task, [(failed[0].problem, None, 2)], 2, params)
    base = prompt_ids(policy, branch.problem)
    assert branch.prefix == base + policy.encode_text(anchor_text(branch.problem, 2)) and branch.anchor_tokens > 0
    assert any(t < 0 for t in branch.prefix[: len(base)]) and all(len(c.ids) > 0 for c in branch.completions)
    batch = build_batch([branch], torch.tensor([[1.0, -1.0]]), policy.pad_id)
    assert torch.all(batch.loss_mask[:, : len(branch.prefix) - 1] == 0)
    minibatch_loss(policy, batch, slice(None), knobs, max_len=8)[0].backward()


def test_text_only_problem_with_the_vlm_policy():
    policy = HFVLMPolicy(*make_vlm("llava"))
    (p,) = get_task("chain").problems(1, 0, 1)
    ids = prompt_ids(policy, p)
    assert all(t >= 0 for t in ids) and policy.image_token_id not in ids
    (out,) = policy.generate([ids], SamplingParams(max_new_tokens=4, temperature=0))
    with torch.no_grad():
        x = torch.tensor([ids + out])
        want = policy.model(input_ids=x).logits
        assert torch.allclose(policy.logits(x, torch.ones_like(x)), want, atol=1e-6)


def test_rl_cli_with_backend_hf_vlm(tmp_path, capsys):
    """`thinkling rl` end to end on shapes pictures with a tiny LLaVA saved as a model folder."""
    model, processor = make_vlm("llava")
    model.save_pretrained(tmp_path / "tiny-llava")
    processor.save_pretrained(tmp_path / "tiny-llava")
    recipe = tmp_path / "rl.yaml"
    recipe.write_text(f"""output_dir: {tmp_path / "run"}
seed: 0
model: {{backend: hf_vlm, name: {tmp_path / "tiny-llava"}, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
train: {{name: shapes, size: 8, difficulty: [2], seed: 0}}
eval: {{name: shapes, size: 2, difficulty: [2], seed: 1, max_new_tokens: 4}}
rl: {{algorithm: grpo, steps: 2, prompts_per_step: 2, group_size: 2, lr: 1.0e-3, max_new_tokens: 6}}
""")
    assert main(["rl", str(recipe)]) == 0, capsys.readouterr().err
    final = load_policy(tmp_path / "run")
    assert isinstance(final, HFVLMPolicy) and final.lora is not None
    with pytest.raises(ThinklingError, match="hf_vlm"):  # the bad key is named, nothing written
        from thinkling.config import ModelConfig

        ModelConfig(backend="hf_vlm").validate()
    assert main(["rl", str(recipe), f"output_dir={tmp_path / 'bad'}", "model.backend=tiny",
                 "model.train_vision=true"]) == 2
    assert "model.train_vision" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_language_only_and_vision_frozen(family, tmp_path):
    policy = HFVLMPolicy.create(*make_vlm(family), lora={"r": 4, "alpha": 8, "dropout": 0.0})
    language = language_module_name(policy.model)
    vision = vision_module_names(policy.model)
    assert vision
    lora_names = [n for n, _ in policy.model.named_parameters() if "lora_" in n]
    assert lora_names and all(f".{language}." in n for n in lora_names)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    # beside the adapters, peft trains a copy of the connector (modules_to_save), saved with them
    connector = {n for n in trainable if ".modules_to_save.default." in n}
    assert trainable == set(lora_names) | connector
    assert connector and all(any(f".{c}." in n for c in connector_module_names(policy.model)) for n in connector)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    _one_step(policy)
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_A" in n for n in changed)  # lora_B starts at zero; A moves once B has moved
    assert changed & connector


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
    prompts, _ = prompts_and_images(policy)
    ids, attention = pad_batch(prompts, policy.pad_id)
    with torch.no_grad():
        assert torch.allclose(policy.logits(ids, attention), again.logits(ids, attention), atol=1e-6)


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
    prompts, _ = prompts_and_images(policy)
    examples = [make_example(policy, p, "ok") for p in prompts]
    ids, attention, weights = collate(examples, policy.pad_id)
    policy.model.train()
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero: A gets a gradient once B has moved
        optimizer.zero_grad()
        sft_loss(policy, ids, attention, weights).backward()
        optimizer.step()
    policy.model.eval()
