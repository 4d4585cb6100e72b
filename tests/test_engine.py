"""The rollout engine against transformers' `generate` on tiny random models (no downloads).

Speed is never asserted here (benchmarks/ measures it); these tests pin down
that the engine samples what plain sampling samples.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from thinkling.errors import ThinklingError
from thinkling.models.base import SamplingParams
from thinkling.models.hf import HFPolicy
from thinkling.models.hf_engine import RolloutEngine, unsupported_reason
from thinkling.models.sampling import sample_tokens

V, PAD, EOS = 97, 0, 3
ARCHS = {
    "llama": transformers.LlamaConfig,  # grouped-query attention below (4 heads, 2 kv heads)
    "qwen2": transformers.Qwen2Config,  # q/k/v biases
    "qwen3": transformers.Qwen3Config,  # per-head q/k RMSNorm
}


def make_model(arch="llama", seed=0, **over):
    torch.manual_seed(seed)
    kwargs = {
        "vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": PAD,
        "initializer_range": 0.2,  # peaked logits: greedy decoding has no near-ties
    }
    if arch != "llama":
        kwargs["head_dim"] = 8
    kwargs.update(over)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch](**kwargs)).eval()
    if arch == "qwen2":  # biases start at zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


def reference(model, prompts, params):
    """transformers' generate through HFPolicy's reference path."""
    policy = _policy(model)
    return policy.generate_reference(prompts, params)


def _policy(model):
    from test_hf_policy import (
        make_tokenizer,  # the char tokenizer of the HFPolicy tests
    )

    tok = make_tokenizer()
    tok.eos_token, tok.pad_token = tok.convert_ids_to_tokens(EOS), tok.convert_ids_to_tokens(PAD)
    return HFPolicy(model, tok)


def engine(model, **kw):
    return RolloutEngine(model, eos_id=EOS, pad_id=PAD, **kw)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [5, 6, 7, 8, 9, 10, 11], [40]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_hf_generate_on_mixed_length_prompts(arch):
    model = make_model(arch)
    out = engine(model).generate(PROMPTS, GREEDY)
    assert out == reference(model, PROMPTS, GREEDY)
    assert out == [reference(model, [p], GREEDY)[0] for p in PROMPTS]
    assert any(len(o) < GREEDY.max_new_tokens for o in out) or all(EOS not in o for o in out)


def test_padding_batch_equals_single_prompts():
    model = make_model(seed=1)
    eng = engine(model)
    assert eng.generate(PROMPTS, GREEDY) == [eng.generate([p], GREEDY)[0] for p in PROMPTS]


def test_prefix_sharing_on_and_off_agree():
    model = make_model(seed=2)
    group = [p for p in PROMPTS[:3] for _ in range(4)]  # G = 4 duplicates, as sample_groups asks
    on, off = engine(model), engine(model, share_prefixes=False)
    assert on.generate(group, GREEDY) == off.generate(group, GREEDY)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    assert on.generate(group, sampled) == off.generate(group, sampled)


def test_seeded_sampling_is_reproducible():
    model = make_model(seed=3)
    eng = engine(model)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = eng.generate(PROMPTS, params)
    assert first == eng.generate(PROMPTS, params)
    assert first != eng.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=8))
    # without a seed the global RNG is used, so torch.manual_seed reproduces it
    torch.manual_seed(0)
    a = eng.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    torch.manual_seed(0)
    assert a == eng.generate(PROMPTS, SamplingParams(max_new_tokens=10))


def test_stop_on_eos_and_max_new_tokens_with_compaction():
    """Rows stop at different steps (the batch is compacted twice on the way); the
    processor only sees the rows still running, with their completion ids so far."""
    model = make_model(seed=4)
    prompts = [[10 + i, 11, 12 + i] for i in range(6)]
    stop_at = {0: 2, 1: 5, 2: 1, 3: 7}  # row -> step at which eos is forced (7 is the last step)
    seen = []

    def processor(logits, history):
        seen.append(history.shape)
        assert logits.shape[0] == history.shape[0]
        t = history.shape[1]
        logits = logits.clone()
        logits[:, EOS] = -float("inf")
        for r in range(logits.shape[0]):
            row = r if t == 0 else int(history[r, 0]) - 30  # step 0 tags each row with token 30 + row
            forced = 30 + row if t == 0 else EOS if stop_at.get(row) == t else None
            if forced is not None:
                logits[r] = -float("inf")
                logits[r, forced] = 0
        return logits

    params = SamplingParams(max_new_tokens=8, temperature=0, logits_processor=processor)
    out = engine(model).generate(prompts, params)
    assert [len(o) for o in out] == [3, 6, 2, 8, 8, 8]
    assert [o[-1] == EOS for o in out] == [True, True, True, True, False, False]
    assert [o[0] for o in out] == [30 + i for i in range(6)]
    assert seen == [torch.Size([n, t]) for t, n in enumerate([6, 6, 5, 4, 4, 4, 3, 3])]
    assert out == reference(model, prompts, params)
    assert engine(model).generate(prompts, SamplingParams(max_new_tokens=0)) == [[] for _ in prompts]


def test_processor_sees_the_completion_so_far():
    model = make_model(seed=5)
    calls = []

    def record(logits, history):
        calls.append(history.clone())
        logits = logits.clone()
        logits[:, EOS] = -float("inf")
        return logits

    out = engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0, logits_processor=record))
    assert len(calls) == 6
    for t, history in enumerate(calls):
        assert history.tolist() == [o[:t] for o in out]


def test_sampler_matches_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_tokens(logits.expand(n, 6), 0.7, 1.0, g)
    freq = torch.bincount(draws, minlength=6).float() / n
    assert torch.allclose(freq, torch.softmax(logits[0] / 0.7, -1), atol=0.015)
    # top-p keeps the smallest head with mass >= p, renormalised
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    head = order[: int((probs[order].cumsum(0) < 0.8).sum()) + 1]
    draws = sample_tokens(logits.expand(n, 6), 1.0, 0.8, g)
    kept = torch.zeros(6, dtype=torch.bool)
    kept[head] = True
    freq = torch.bincount(draws, minlength=6).float() / n
    assert freq[~kept].sum() == 0
    assert torch.allclose(freq[kept], probs[kept] / probs[kept].sum(), atol=0.015)
    # a token with probability 0 is never drawn
    banned = logits.expand(n, 6).clone()
    banned[:, int(order[0])] = -float("inf")
    assert not (sample_tokens(banned, 1.0, 1.0, g) == order[0]).any()


def test_two_level_cdf_inversion_equals_a_full_cumsum():
    from thinkling.models.sampling import _invert_cdf

    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(64, 1000, generator=g) * 3, -1)
    probs[:, 500:700] = 0  # whole zero blocks and a ragged last block (1000 = 3 * 256 + 232)
    u = torch.rand(64, 1, dtype=torch.float64, generator=g)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    assert torch.equal(_invert_cdf(probs, u)[0], expected)


def test_weights_are_refreshed_after_an_update():
    model = make_model(seed=6)
    eng = engine(model)
    before = eng.generate(PROMPTS, GREEDY)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = model(torch.tensor([PROMPTS[0]])).logits.square().mean()
    loss.backward()
    opt.step()
    after = eng.generate(PROMPTS, GREEDY)
    assert after == reference(model, PROMPTS, GREEDY)
    assert after != before


def test_lora_adapters_are_folded_in():
    peft = pytest.importorskip("peft")
    model = make_model(seed=7)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    lora = peft.get_peft_model(model, config)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapters change the model
    lora.eval()
    assert unsupported_reason(lora) is None
    assert engine(lora).generate(PROMPTS, GREEDY) == reference(lora, PROMPTS, GREEDY)


def test_released_weights_are_rebuilt_on_the_next_generate():
    policy = _policy(make_model(seed=10))
    first = policy.generate(PROMPTS, GREEDY)
    engine_ = policy.rollout_engine()
    assert engine_._weights is not None
    policy.release_generation_memory()
    assert engine_._weights is None
    assert policy.generate(PROMPTS, GREEDY) == first and engine_._weights is not None


def test_bfloat16_decoding_runs_and_mostly_agrees():
    model = make_model(seed=8)
    out = engine(model, dtype=torch.bfloat16).generate(PROMPTS, GREEDY)
    ref = engine(model).generate(PROMPTS, GREEDY)
    assert [len(o) for o in out] and all(0 < len(o) <= 12 for o in out)
    assert sum(a[0] == b[0] for a, b in zip(out, ref)) >= len(PROMPTS) - 1  # the first token: fp32 vs bf16


def test_policy_uses_the_engine_and_falls_back_for_other_models():
    llama = _policy(make_model(seed=9))
    assert llama.rollout_engine() is not None
    assert llama.generate(PROMPTS, GREEDY) == llama.generate_reference(PROMPTS, GREEDY)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2)).eval()
    assert "model_type" in unsupported_reason(gpt2)
    with pytest.raises(ThinklingError, match="does not support"):
        engine(gpt2)
    policy = _policy(gpt2)
    assert policy.rollout_engine() is None
    assert policy.generate(PROMPTS, GREEDY) == policy.generate_reference(PROMPTS, GREEDY)


def test_errors():
    eng = engine(make_model())
    with pytest.raises(ThinklingError, match="empty"):
        eng.generate([[5], []], GREEDY)
    with pytest.raises(ThinklingError, match="top_p"):
        eng.generate([[5]], SamplingParams(top_p=0))
    assert eng.generate([], GREEDY) == []


def test_shifted_bf16_head_is_precise_near_the_top():
    """A bf16 matmul rounds its output (±0.25 at magnitude 64); the offset trick leaves only
    the error of rounding its inputs near the top logits."""
    from thinkling.models.hf_engine import _ShiftedHead

    g = torch.Generator().manual_seed(0)
    weight, hidden = torch.randn(500, 64, generator=g), torch.randn(4, 64, generator=g) * 3
    exact = hidden @ weight.T
    plain = (hidden.bfloat16() @ weight.bfloat16().T).float()
    inputs_only = hidden.bfloat16().float() @ weight.bfloat16().float().T  # bf16 inputs, fp32 output
    shifted = _ShiftedHead(weight, None, pack=True)(hidden)
    top = exact.topk(5, dim=-1).indices
    err = lambda x: (x.gather(1, top) - exact.gather(1, top)).abs().max()
    assert err(shifted) <= err(inputs_only) + 0.01 < err(plain)
    # the offset from the first 100 ids only: as precise where the top lies among them, better than plain elsewhere
    probed = _ShiftedHead(weight, None, pack=True, frequent=100)
    assert probed.probe is not probed.linear
    hidden = torch.randn(64, 64, generator=g) * 3
    exact, probed_logits = hidden @ weight.T, probed(hidden)
    full = _ShiftedHead(weight, None, pack=True)(hidden)
    plain = (hidden.bfloat16() @ weight.bfloat16().T).float()
    inside = exact.argmax(-1) < 100
    assert 0 < int(inside.sum()) < 64
    top = exact.topk(5, dim=-1).indices
    row_err = lambda x: (x.gather(1, top) - exact.gather(1, top)).abs().amax(-1)
    assert torch.allclose(probed_logits[inside].gather(1, top[inside]), full[inside].gather(1, top[inside]), atol=0.01)
    assert row_err(probed_logits).mean() < row_err(plain).mean()


def test_engine_logprobs_are_the_trainers_in_fp32_and_drift_in_bf16():
    """The engine records each sampled token's log-prob: in fp32 they equal the training forward's;
    with bf16 rollout weights they differ a little, which `offpolicy/kl` measures."""
    from thinkling.models.logprobs import sequence_logprobs
    from thinkling.train.rl import sampler_correction

    model = make_model()
    policy = _policy(model)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, seed=4)
    drift = {}
    for dtype in (torch.float32, torch.bfloat16):
        samples = engine(model, dtype=dtype).sample(PROMPTS, params)
        gaps = []
        for prompt, s in zip(PROMPTS, samples):
            ids = torch.tensor([prompt + s.ids])
            trainer = sequence_logprobs(policy, ids, torch.ones_like(ids), temperature=0.8)[0, len(prompt) - 1:]
            gaps.append(torch.tensor(s.logprobs) - trainer)
        gap = torch.cat(gaps)
        drift[dtype] = gap
        _, stats = sampler_correction(-gap[None], torch.zeros(1, len(gap)), torch.ones(1, len(gap)), cap=2.0)
        assert stats["offpolicy/ratio_max"] >= 1.0
    assert drift[torch.float32].abs().max() < 1e-4
    assert drift[torch.bfloat16].abs().max() > drift[torch.float32].abs().max()


def test_decode_attention_over_float32_keys():
    """The engine's decode step in PyTorch (`explicit_attention` with one query per row, where the C
    kernel of `cpu_kernels` does not apply): grouped query heads
    over float32 keys with a padding mask equal SDPA in float32, and with bf16 values are closer to
    float32 attention than SDPA over a bf16 cache (what it replaced)."""
    import torch.nn.functional as F

    from thinkling.models.hf_attention import explicit_attention

    g = torch.Generator().manual_seed(0)
    B, H, KV, L, d = 5, 6, 2, 9, 16
    q = torch.randn(B, H, 1, d, generator=g) * 3  # scores of a few units, where rounding q and k shows
    k, v = torch.randn(B, KV, L, d, generator=g), torch.randn(B, KV, L, d, generator=g)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert torch.allclose(explicit_attention(q, k, v, mask, 0.3), ref, atol=1e-6)
    bf = lambda x: x.bfloat16()
    ours = explicit_attention(q, k, bf(v), mask, 0.3).float()
    before = F.scaled_dot_product_attention(bf(q), bf(k), bf(v), attn_mask=mask, scale=0.3, enable_gqa=True)
    assert (ours - ref).abs().mean() < (before.float() - ref).abs().mean()
