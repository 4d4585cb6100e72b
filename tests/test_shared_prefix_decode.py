"""Decoding that reads each prompt's keys once for all the rows that share it
(`attention.shared_prefix_attention`, the tiny sampler's `_SharedPrefixState`) must compute what
attention over a per-row copy of the prompt's cache computes."""

import pytest
import torch
import torch.nn.functional as F

from thinkling.models.attention import PrefixGrid, shared_prefix_attention
from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyPolicy


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_shared_prefix_attention_equals_attention_over_copied_prefixes(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    N, P, S, d = 3, 7, 5, 8
    owner = torch.tensor([2, 0, 0, 1, 2, 2, 0, 2])  # unsorted, uneven groups
    B = len(owner)
    prefix_k, prefix_v = torch.randn(N, kv_heads, P, d, generator=g), torch.randn(N, kv_heads, P, d, generator=g)
    k, v = torch.randn(B, kv_heads, S, d, generator=g), torch.randn(B, kv_heads, S, d, generator=g)
    q = torch.randn(B, heads, 1, d, generator=g)
    valid = torch.ones(N, P, dtype=torch.bool)
    valid[0, :3], valid[2, :1] = False, False  # left padding of two prompts
    bias = torch.zeros(N, P).masked_fill(~valid, float("-inf"))[:, None, None]

    got = shared_prefix_attention(q, prefix_k, prefix_v, bias, PrefixGrid.of(owner, N), k, v, 0.3)

    full_k, full_v = torch.cat([prefix_k[owner], k], dim=2), torch.cat([prefix_v[owner], v], dim=2)
    mask = torch.cat([valid[owner], torch.ones(B, S, dtype=torch.bool)], dim=1)[:, None, None]
    want = F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=mask, scale=0.3,
                                          enable_gqa=heads != kv_heads)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_prefix_grid_places_rows_of_a_prefix_side_by_side():
    grid = PrefixGrid.of(torch.tensor([1, 0, 1, 1, 0]), 3)
    assert grid.width == 3
    assert grid.place.tolist() == [3, 0, 4, 5, 1]  # prefix * width + rank within the prefix


def _policy(**config):
    p = TinyPolicy.create({"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64, **config}, seed=0)
    with torch.no_grad():  # large weights: greedy outputs vary from token to token
        for name, w in p.model.named_parameters():
            if "norm" not in name:
                w.mul_(16)
    return p


def _both(policy, prompts, params, share_prompts=True):
    out = {}
    for shared in (True, False):
        policy.shared_prefix_decode = shared
        out[shared] = policy.sample(prompts, params, share_prompts=share_prompts)
    del policy.shared_prefix_decode
    return out[True], out[False]


@pytest.mark.parametrize("attention", ["standard", "ssa"])
def test_tiny_sampler_with_shared_prefixes_matches_the_copied_cache(attention):
    policy = _policy(attention=attention)
    assert policy.model.shares_prefix_keys()
    texts = ["12+3=", "a", "12+3=", "The quick brown fox", "a", "12+3=", "xyz", "12+3="]
    prompts = [policy.encode_prompt(t) for t in texts]
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    fast, ref = _both(policy, prompts, greedy)
    assert [s.ids for s in fast] == [s.ids for s in ref]
    assert [s.ids for s in fast] == policy.generate_reference(prompts, greedy)
    # sampled, with rows finishing early (eos forced at different steps) so the batch is compacted
    def stop(logits, history):
        if history.shape[1] >= 3:
            logits[: history.shape[1] - 2, policy.eos_id] = 1e4
        return logits

    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, logits_processor=stop)
    for share in (True, False):
        fast, ref = _both(policy, prompts, params, share_prompts=share)
        assert [s.ids for s in fast] == [s.ids for s in ref]
        assert len({len(s.ids) for s in fast}) > 1
        for a, b in zip(fast, ref):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_variants_with_their_own_forward_keep_the_copied_cache():
    policy = _policy(attention="cat", attention_options={"rope": False})
    assert not policy.model.shares_prefix_keys()
    prompts = [policy.encode_prompt(t) for t in ["12+3=", "12+3=", "ab"]]
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    assert policy.generate(prompts, greedy) == policy.generate_reference(prompts, greedy)


def test_dense_grid_needs_no_scatter_and_gives_the_same_attention():
    g = torch.Generator().manual_seed(1)
    owner = torch.arange(3).repeat_interleave(4)  # GRPO's layout: G copies of each prompt, in order
    dense = PrefixGrid.of(owner, 3)
    assert dense.dense and not PrefixGrid.of(owner[1:], 3).dense
    sparse = PrefixGrid(dense.owner, dense.place, dense.n, dense.width, dense=False)
    q = torch.randn(12, 4, 1, 8, generator=g)
    pk, pv = torch.randn(3, 2, 5, 8, generator=g), torch.randn(3, 2, 5, 8, generator=g)
    k, v = torch.randn(12, 2, 3, 8, generator=g), torch.randn(12, 2, 3, 8, generator=g)
    bias = torch.zeros(3, 1, 1, 5)
    a = shared_prefix_attention(q, pk, pv, bias, dense, k, v, 0.5)
    b = shared_prefix_attention(q, pk, pv, bias, sparse, k, v, 0.5)
    assert torch.equal(a, b)
