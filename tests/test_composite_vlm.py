"""The composite VLM (`models.composite_vlm`, `thinkling vlm-build`): an encoder trained here on
shapes pictures + a fresh connector + a language model, saved as a LLaVA folder that
`model.backend: hf_vlm` loads. Built from a tiny random Llama and a char tokenizer made in the
test (no download); the real build (SmolLM2) is measured in docs/vlm.md.
"""

from __future__ import annotations

import string
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")
from sft_resume import straight_and_resumed  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from thinkling.cli import main  # noqa: E402
from thinkling.config import RLConfig  # noqa: E402
from thinkling.errors import ThinklingError  # noqa: E402
from thinkling.models import load_policy  # noqa: E402
from thinkling.models.base import SamplingParams, pad_batch  # noqa: E402
from thinkling.models.composite_vlm import (  # noqa: E402
    IMAGE_TOKEN,
    build_composite,
    cell_targets,
    load_encoder,
    probe_accuracy,
)
from thinkling.models.hf_vlm import HFVLMPolicy  # noqa: E402
from thinkling.rollout.groups import sample_groups  # noqa: E402
from thinkling.tasks import get_task  # noqa: E402
from thinkling.train.rl import build_batch, minibatch_loss, resolve_knobs  # noqa: E402
from thinkling.train.sft import collate, sft_examples, sft_loss  # noqa: E402

SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<unk>"]
VOCAB = {t: i for i, t in enumerate(SPECIALS + list(string.ascii_letters + string.digits + string.punctuation + " \n"))}
ENCODER = {"steps": 3, "n_train": 16, "n_eval": 8, "batch_size": 4, "hidden_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 32}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A tiny random Llama with a char-level ChatML tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-lm")
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                                     pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=3, pad_token_id=0, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("composite") / "vlm"
    info = build_composite(out, lm=str(lm_folder), encoder_settings=ENCODER)
    return out, info


def _shapes(n, seed=0):
    return get_task("shapes", question="mood").problems(n, seed, [1, 2])


def test_cell_targets_put_each_shape_at_its_cell():
    colour, form = cell_targets([("red", "circle", "tl"), ("blue", "triangle", "br")], 3)
    assert colour == [1, 0, 0, 0, 0, 0, 0, 0, 4] and form == [1, 0, 0, 0, 0, 0, 0, 0, 4]
    colour, _ = cell_targets([("green", "ring", "mc")], 6)  # 2x2 patches per cell: the centre-ish one
    assert colour.index(3) == 3 * 6 + 3 and sum(colour) == 3
    with pytest.raises(ThinklingError, match="multiple of 3"):
        cell_targets([], 4)


def test_probe_accuracy():
    targets = torch.tensor([[[1, 2], [0, 0]], [[3, 3], [1, 0]]])  # [n=2, P=2, (colour, form)]
    logits = torch.nn.functional.one_hot(targets, 5).float()
    logits[1, 1, 1] = torch.tensor([0.0, 0, 0, 0, 1])  # one wrong form
    acc = probe_accuracy(logits, targets)
    assert acc == {"colour": 1.0, "form": 0.75, "scene": 0.5}


def test_build_writes_a_folder_hf_vlm_loads(built, lm_folder):
    out, info = built
    assert info["image_tokens"] == 9 and info["parameters"]["projector"] > 0
    assert {"model.safetensors", "policy.json", "build.json", "processor_config.json"} <= {p.name for p in out.iterdir()}
    assert load_encoder(out / "encoder").config.hidden_size == 16
    policy = load_policy(out)  # the untrained start is a policy `thinkling eval --model` takes
    assert isinstance(policy, HFVLMPolicy) and policy.lora is None
    assert policy.image_token_id == policy.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    (p,) = _shapes(1)
    ids = policy.encode_prompt(p.prompt, p.images)
    assert sum(t < 0 for t in ids) == 9
    # text-only prompts: exactly the language model's logits (its weights were copied in)
    lm = transformers.AutoModelForCausalLM.from_pretrained(lm_folder)
    x = torch.tensor([policy.encode_text("<|im_start|>user\nhi<|im_end|>\n")])
    with torch.no_grad():
        assert torch.allclose(policy.logits(x, torch.ones_like(x))[..., : len(VOCAB)], lm(input_ids=x).logits,
                              atol=1e-5)
        (out_ids,) = policy.generate([ids], SamplingParams(max_new_tokens=4, temperature=0))
    assert policy.image_token_id not in out_ids


def test_sft_step_trains_projector_and_lora_not_vision(built, tmp_path):
    out, _ = built
    policy = HFVLMPolicy.load(str(out), lora=LORA)
    params = dict(policy.model.named_parameters())
    projector = {n for n in params if "multi_modal_projector" in n and params[n].requires_grad}
    vision = {n for n in params if "vision_tower" in n}
    assert projector and vision and not any(params[n].requires_grad for n in vision)
    before = {n: p.detach().clone() for n, p in params.items()}
    examples = sft_examples(policy, get_task("shapes"), _shapes(3))
    ids, mask, weights = collate(examples, policy.pad_id)
    optimizer = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=1e-2)
    policy.model.train()
    for _ in range(2):  # LoRA's B starts at zero: A moves once B has
        optimizer.zero_grad()
        sft_loss(policy, ids, mask, weights).backward()
        assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in projector)
        optimizer.step()
    policy.model.eval()
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert projector <= changed and not changed & vision
    assert any("lora_A" in n for n in changed)
    assert all("lora_" in n or n in projector for n in changed)  # the language model's base weights stay
    # the trained connector is saved with the adapters and comes back with them (what a resume loads)
    policy.save(str(tmp_path / "adapters"))
    again = load_policy(tmp_path / "adapters")
    batch, attention = pad_batch([policy.encode_prompt(p.prompt, p.images) for p in _shapes(2, seed=5)],
                                 policy.pad_id)
    with torch.no_grad():
        assert torch.allclose(policy.logits(batch, attention), again.logits(batch, attention), atol=1e-6)
    assert not torch.allclose(HFVLMPolicy.load(str(out)).logits(batch, attention), again.logits(batch, attention))


def test_grpo_step_on_an_image_prompt(built):
    out, _ = built
    policy = HFVLMPolicy.load(str(out), lora=LORA)
    task = get_task("shapes", question="mood")
    groups = sample_groups(policy, task, [(p, None, 0) for p in _shapes(2)], 3,
                           SamplingParams(max_new_tokens=6, temperature=1.0, seed=1))
    assert all(any(t < 0 for t in g.prefix) for g in groups)
    batch = build_batch(groups, torch.tensor([[1.0, -0.5, -0.5], [0.5, 0.5, -1.0]]), policy.pad_id)
    params = dict(policy.model.named_parameters())
    policy.model.train()
    loss = minibatch_loss(policy, batch, slice(None), resolve_knobs(RLConfig(algorithm="grpo")), max_len=6)[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in params.items() if "multi_modal_projector" in n)
    assert all(p.grad is None for n, p in params.items() if "vision_tower" in n)


@pytest.mark.slow
def test_sft_cli_resume_gives_the_same_adapters_and_connector(built, tmp_path, capsys):
    """`thinkling sft` on the composite: 2 steps == 1 step, crash, resume, 1 more; the connector
    trained beside the adapters is in the checkpoint and comes back on resume."""
    out, _ = built
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"""seed: 0
threads: 1
model: {{backend: hf_vlm, name: {out}, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
train: {{name: shapes, options: {{question: mood}}, size: 8, difficulty: [1, 2], seed: 0}}
eval: {{name: shapes, options: {{question: mood}}, size: 2, difficulty: [1], seed: 1, max_new_tokens: 4}}
sft: {{steps: 2, batch_size: 2, lr: 1.0e-2, warmup_steps: 0, save_every: 1}}
""")
    a, b = straight_and_resumed(recipe, tmp_path, capsys)
    wa, wb = load_policy(a).model.state_dict(), load_policy(b).model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    base = HFVLMPolicy.load(str(out)).model.state_dict()
    trained = [n for n in wa if "multi_modal_projector.modules_to_save" in n]
    assert trained and all(not torch.equal(wa[n], base[n.replace("base_model.model.", "").replace(
        "modules_to_save.default.", "")]) for n in trained)


def test_vlm_build_bad_inputs_are_one_line_and_write_nothing(lm_folder, tmp_path, capsys):
    out = tmp_path / "vlm"
    assert main(["vlm-build", "--out", str(out), "--lm", str(lm_folder), "--encoder", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no encoder checkpoint" in err and str(tmp_path / "nope") in err and len(err.strip().splitlines()) == 1
    assert main(["vlm-build", "--out", str(out), "--lm", str(tmp_path / "no-lm")]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert main(["vlm-build", "--out", str(out), "--lm", str(lm_folder), "--patch-size", "9"]) == 2
    assert "multiple of" in capsys.readouterr().err
    assert main(["vlm-build", "--out", str(out), "--encoder-steps", "0"]) == 2
    assert "--encoder-steps" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    with pytest.raises(ThinklingError, match="already exists"):
        build_composite(lm_folder, lm=str(lm_folder))
