import json

import pytest
import torch

from thinkling.errors import ThinklingError
from thinkling.models.attention import KVCache
from thinkling.models.base import Policy, SamplingParams
from thinkling.models.logprobs import sequence_logprobs
from thinkling.models.tiny import TinyConfig, TinyPolicy
from thinkling.models.tokenizer import CharTokenizer

CONFIG = {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64}
TEXTS = ["12+3=", "a", "hello world", "12+3=", "xyz", "The quick brown fox", "12+3=", "a"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread and lose a lot when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy():
    """A random model with large weights, so greedy outputs vary from token to token."""
    p = TinyPolicy.create(CONFIG, seed=0)
    with torch.no_grad():
        for name, w in p.model.named_parameters():
            if "norm" not in name:
                w.mul_(16)
    return p


@pytest.fixture(scope="module")
def prompts(policy):
    return [policy.encode_prompt(t) for t in TEXTS]


def greedy(n=24, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


def right_pad(seqs, pad=0):
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    text = "[short] 12+3=15\nWait, A:15 ~"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 99)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))).encode(text) == ids


def test_tokenizer_unknown_character():
    with pytest.raises(ThinklingError, match=r"'é' at position 3"):
        CharTokenizer().encode("caféx")


# --- sampler ---------------------------------------------------------------------------


def test_kv_cache_greedy_equals_reference(policy, prompts):
    fast = policy.generate(prompts, greedy())
    assert fast == policy.generate_reference(prompts, greedy())
    assert len({tuple(o) for o in fast}) > 3 and len(set(fast[2])) > 3  # the test is not vacuous


def test_batch_equals_alone(policy, prompts):
    batch = policy.generate(prompts, greedy())
    assert batch == [policy.generate([p], greedy())[0] for p in prompts]


def test_prompt_sharing_on_off(policy, prompts):
    assert policy.generate(prompts, greedy()) == policy.generate(prompts, greedy(), share_prompts=False)


def test_seeded_sampling(policy, prompts):
    sample = lambda seed: policy.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed))
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    same_prompt = sample(1)
    assert same_prompt[0] != same_prompt[3]  # duplicates share a prefill, not their samples


def test_tiny_top_p_is_greedy(policy, prompts):
    nucleus = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=1e-6, seed=0)
    assert policy.generate(prompts, nucleus) == policy.generate(prompts, greedy())


def test_stops_at_eos_and_max_new_tokens(policy, prompts):
    eos = policy.eos_id

    def force_eos(logits, history):  # row-dependent stop: after 1 + (first token % 6) tokens
        if history.shape[1] == 0:
            return logits
        stop = history.shape[1] >= 1 + history[:, 0] % 6
        return torch.where(stop[:, None], torch.full_like(logits, -1e9).index_fill(1, torch.tensor([eos]), 0), logits)

    out = policy.generate(prompts, greedy(12, logits_processor=force_eos))
    for o in out:
        assert o[-1] == eos and eos not in o[:-1] and len(o) == 2 + o[0] % 6
    assert out == policy.generate_reference(prompts, greedy(12, logits_processor=force_eos))
    assert [len(o) for o in policy.generate(prompts, greedy(5))] == [5] * len(prompts)
    assert policy.generate(prompts[:2], greedy(0)) == [[], []]
    long = [[1] + [5] * 60]  # max_seq_len 64 leaves room for 3 tokens
    assert len(policy.generate(long, greedy(10))[0]) == 3


def test_logits_processor_sees_history(policy, prompts):
    def recorder(calls):
        def proc(logits, history):
            calls.append(history.tolist())
            if history.shape[1] == 0:
                return logits
            stop = history.shape[1] >= 2 + history[:, 0] % 7
            return logits.masked_fill(stop[:, None] & (torch.arange(logits.shape[1]) == policy.eos_id), 1e9)

        return proc

    fast_calls, ref_calls = [], []
    out = policy.generate(prompts, greedy(10, logits_processor=recorder(fast_calls)))
    policy.generate_reference(prompts, greedy(10, logits_processor=recorder(ref_calls)))
    assert fast_calls == ref_calls
    for t, history in enumerate(fast_calls):  # live rows only, in prompt order, the tokens so far
        assert history == [o[:t] for o in out if len(o) > t]


# --- model -----------------------------------------------------------------------------


def test_causality(policy, prompts):
    ids = torch.tensor([prompts[5]])
    changed = ids.clone()
    changed[0, 10] = (changed[0, 10] + 7) % 99
    a, b = policy.model(ids), policy.model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_right_padding_does_not_change_logits(policy, prompts):
    ids, mask = right_pad(prompts)
    batch = policy.logits(ids, mask)
    for i, p in enumerate(prompts):
        alone = policy.logits(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
        torch.testing.assert_close(batch[i, : len(p)], alone[0])
    with pytest.raises(ThinklingError, match="right-padded"):
        policy.logits(ids, mask.flip(1))


def test_left_padding_and_embeds_inputs(policy, prompts):
    p = prompts[5]
    ids = torch.tensor([[0] * 4 + p])
    mask = torch.tensor([[0] * 4 + [1] * len(p)])
    left = policy.model(ids, attention_mask=mask)[0, 4:]
    plain = policy.model(torch.tensor([p]))
    torch.testing.assert_close(left, plain[0])
    embeds = policy.model.embed(torch.tensor([p]))
    torch.testing.assert_close(policy.model(inputs_embeds=embeds), plain)


def test_sequence_logprobs(policy, prompts):
    ids, mask = right_pad(prompts)
    lp = sequence_logprobs(policy, ids, mask)
    full = torch.log_softmax(policy.logits(ids, mask).float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp, full * mask[:, 1:])
    assert lp.shape == (len(prompts), ids.shape[1] - 1)


def test_save_load_round_trip(policy, prompts, tmp_path):
    assert isinstance(policy, Policy)
    policy.save(tmp_path)
    assert json.loads((tmp_path / "policy.json").read_text()) == {"backend": "tiny"}
    loaded = TinyPolicy.load(tmp_path)
    ids, mask = right_pad(prompts)
    assert torch.equal(loaded.logits(ids, mask), policy.logits(ids, mask))
    assert loaded.model.lm_head.weight is loaded.model.embed.weight

    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ThinklingError, match="model.safetensors"):
        TinyPolicy.load(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ThinklingError, match="config.json"):
        TinyPolicy.load(tmp_path)


def test_create_is_deterministic_and_counts_parameters():
    state = torch.get_rng_state()
    a, b = TinyPolicy.create(CONFIG, seed=3), TinyPolicy.create(TinyConfig(vocab_size=99, **CONFIG), seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert not torch.equal(a.model.embed.weight, TinyPolicy.create(CONFIG, seed=4).model.embed.weight)
    d, f, v, n = 32, 128, 99, 2  # tied embedding + per layer (qkv, out, swiglu up/down, two norms) + final norm
    assert a.model.num_parameters() == v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"d_model": 0}, "d_model"),
        ({"n_heads": 5}, "n_heads"),
        ({"mlp": "relu"}, "mlp"),
        ({"max_seq_len": 1.5}, "max_seq_len"),
        ({"dmodel": 64}, "dmodel"),
        ({"attention": "fancy"}, "fancy"),
        ({"attention_options": {"kernel": 3}}, "kernel"),
        ({"vocab_size": 10}, "vocab_size"),
    ],
)
def test_bad_config(bad, field):
    with pytest.raises(ThinklingError, match=field):
        TinyPolicy.create({**CONFIG, **bad})


def test_bad_sampling_params(policy, prompts):
    with pytest.raises(ThinklingError, match="top_p"):
        policy.generate(prompts, SamplingParams(top_p=0))
    with pytest.raises(ThinklingError, match="prompt 0"):
        policy.generate([[]], greedy())


def test_a_completion_depends_on_its_key_not_on_the_batch(policy, prompts):
    """Seeded sampling draws row i from (seed, key i): the same key gives the same completion
    whatever else is in the batch (evaluation batch sizes, BREAD probes, data-parallel shards)."""
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    together = policy.generate(prompts, params)
    for i, prompt in enumerate(prompts):
        alone = policy.generate([prompt], SamplingParams(max_new_tokens=16, temperature=1.0, seed=7, keys=(i,)))
        assert alone == [together[i]]
    shuffled = policy.generate(prompts[::-1], SamplingParams(max_new_tokens=16, temperature=1.0, seed=7,
                                                             keys=tuple(range(len(prompts)))[::-1]))
    assert shuffled == together[::-1]
    assert policy.generate_reference(prompts, params) == together


def test_cache_select_keeps_the_filled_slots_of_the_chosen_rows(policy, prompts):
    """`KVCache.select` (G copies of a prompt after the prefill, compaction) keeps each chosen row's
    filled slots, and the next step attends to them as to the original rows."""
    model = policy.model
    ids = torch.tensor([p[:2] for p in prompts[:3]])
    cache = model.new_cache(3, 10)
    model.hidden(ids, cache=cache)
    rows = torch.tensor([2, 0, 0])
    picked = cache.select(rows)
    assert picked.length == 2 and picked.capacity == 10
    for mine, theirs in zip(picked.layers, cache.layers):
        for name in ("k", "v"):
            assert torch.equal(mine[name][:, :, :2], theirs[name][rows, :, :2])
    step = torch.tensor([[5], [6], [6]])
    want = model.hidden(step, cache=KVCache([{n: t[rows] for n, t in la.items()} for la in cache.layers],
                                            cache.mask[rows], cache.length))
    assert torch.equal(model.hidden(step, cache=picked), want)


def test_cache_branch_shares_the_prompt_slots_and_decodes_as_copies(policy, prompts):
    """`KVCache.branch` (the sampler's G rows of a prompt read its slots once) gives the same
    hidden states as copying the prompt's slots to every row (`select`), before and after a
    compaction that drops and reorders rows (the prompts' query blocks then have gaps)."""
    from thinkling.models.base import pad_batch

    model = policy.model
    ids, valid = pad_batch([p[:n] for p, n in zip(prompts[:3], (5, 2, 4))], policy.pad_id, left=True)
    cache = model.new_cache(3, ids.shape[1] + 4)
    model.hidden(ids, attention_mask=valid, cache=cache)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    shared, copied = cache.branch(rows, 4), cache.select(rows)
    assert shared.prefix is not None and shared.prefix.dense and shared.capacity == 4
    positions = valid.sum(1)[rows]
    for t, keep in enumerate((None, torch.tensor([5, 0, 3, 2]), None)):
        if keep is not None:
            shared, copied, positions = shared.select(keep), copied.select(keep), positions[keep]
            assert not shared.prefix.dense
        step = torch.arange(len(positions))[:, None] % 7 + 3 + t
        want = model.hidden(step, position_ids=positions[:, None], cache=copied)
        got = model.hidden(step, position_ids=positions[:, None], cache=shared)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        positions = positions + 1
