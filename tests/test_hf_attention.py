"""The training forward's explicit CPU attention (`models.hf_attention`): the same numbers as SDPA
in float32, as close to float32 as SDPA under bf16 autocast, and SDPA itself where it does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from thinkling.models import hf_attention
from thinkling.models.hf_attention import explicit_attention


def _inputs(B=3, H=6, KV=2, T=5, P=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h, n in ((H, T), (KV, P + T), (KV, P + T)))
    mask = torch.ones(B, 1, T, P + T, dtype=torch.bool).tril(P)
    mask[0, :, :, :2] = False  # a left-padded prefix
    mask[1, :, 3:, P + 3 :] = False  # right padding of the own part (a padding query still sees earlier keys)
    return q, k, v, mask


def _sdpa(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)


def test_equals_sdpa_in_float32_values_and_gradients():
    q, k, v, mask = _inputs()
    grads = []
    for fn in (_sdpa, lambda q, k, v, m: explicit_attention(q, k, v, m, q.shape[-1] ** -0.5)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_causal_without_mask_and_a_query_with_no_key_stays_finite():
    q, k, v, _ = _inputs(P=0)
    torch.testing.assert_close(explicit_attention(q, k, v, None, q.shape[-1] ** -0.5),
                               F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                              is_causal=True), rtol=1e-5, atol=1e-6)
    mask = torch.zeros(3, 1, 5, 5, dtype=torch.bool)
    assert torch.isfinite(explicit_attention(q, k, v, mask, 0.3)).all()
    # the last query alone (a decode step): causal means every key
    torch.testing.assert_close(explicit_attention(q[:, :, -1:], k, v, None, q.shape[-1] ** -0.5),
                               F.scaled_dot_product_attention(q[:, :, -1:], k.repeat_interleave(3, 1),
                                                              v.repeat_interleave(3, 1)), rtol=1e-5, atol=1e-6)


def test_bf16_values_are_no_further_from_float32_than_sdpa_under_autocast():
    q, k, v, mask = _inputs(B=8, H=9, KV=3, T=24, P=16, d=32, seed=1)
    exact = _sdpa(q, k, v, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = explicit_attention(q, k, v.bfloat16(), mask, q.shape[-1] ** -0.5).float()
        theirs = _sdpa(q, k, v, mask).float()
    assert (ours - exact).abs().mean() <= (theirs - exact).abs().mean()


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    hf_attention.use_for(model)
    return model


def test_a_model_uses_it_under_autocast_only(monkeypatch):
    model = _llama()
    assert model.config._attn_implementation == hf_attention.NAME
    calls = []
    monkeypatch.setattr(hf_attention, "explicit_attention",
                        lambda *a: calls.append(1) or explicit_attention(*a))
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0
    ours = model(input_ids=ids, attention_mask=mask).logits
    assert not calls  # float32: transformers' SDPA path, unchanged
    model.set_attn_implementation("sdpa")
    assert torch.equal(ours, model(input_ids=ids, attention_mask=mask).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = model(input_ids=ids, attention_mask=mask).logits.float()
        model.set_attn_implementation(hf_attention.NAME)
        ours = model(input_ids=ids, attention_mask=mask).logits.float()
    assert len(calls) == 2  # one per layer
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("over", [{"dropout": 0.1}, {"softcap": 30.0}])
def test_what_it_does_not_cover_goes_to_sdpa(monkeypatch, over):
    q, k, v, mask = _inputs()
    monkeypatch.setattr(hf_attention, "explicit_attention", lambda *a: pytest.fail("explicit path taken"))
    called = []
    monkeypatch.setattr(hf_attention, "sdpa_attention_forward", lambda *a, **kw: called.append(kw) or (q, None))
    module = torch.nn.Module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_attention.attention_forward(module, q, k, v.bfloat16(), mask, **over)
    assert called
