"""TinyAlign: memory bank retrieval, leaving self out, save/load, labels, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thinkling.errors import ThinklingError
from thinkling.models.tinyalign import (
    IGNORE_INDEX,
    MemoryBank,
    TinyAlign,
    fuse,
    splice_prefix,
)


def features(n, seed=0, patches=5, di=12, dt=8, dv=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, patches, di, generator=g), torch.randn(n, dt, generator=g),
            torch.randn(n, dv, generator=g))


class MLPConnector(nn.Module):
    """Patch features -> LM-space tokens, one per patch (the plain connector TinyAlign wraps)."""

    def __init__(self, di=12, d=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(di, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x):
        return self.net(x)


def test_fused_keys_weigh_image_and_text():
    img, txt, _ = features(4)
    keys = fuse(img, txt)
    assert torch.allclose(keys.norm(dim=1), torch.ones(4))
    image_part, text_part = keys[:, :12].norm(dim=1), keys[:, 12:].norm(dim=1)
    assert torch.allclose(image_part / text_part, torch.full((4,), 0.4 / 0.6))
    with pytest.raises(ThinklingError, match="3 image rows but 4 text rows"):
        fuse(img[:3], txt)


def test_search_returns_the_true_nearest_neighbours():
    img, txt, values = features(50)
    bank = MemoryBank.build(img, txt, values)
    q_img, q_txt, _ = features(7, seed=1)
    scores, index = bank.search(bank.query_keys(q_img, q_txt), k=5)
    queries = fuse(q_img, q_txt)
    for b in range(7):  # brute force, one entry at a time
        sims = [F.cosine_similarity(queries[b], bank.keys[i], dim=0).item() for i in range(50)]
        best = sorted(range(50), key=lambda i: -sims[i])[:5]
        assert index[b].tolist() == best
        assert scores[b].tolist() == pytest.approx([sims[i] for i in best], abs=1e-6)


def test_training_pairs_never_retrieve_themselves():
    img, txt, values = features(20)
    # two entries per training example (e.g. two captions): both are left out for that example
    bank = MemoryBank.build(torch.cat([img, img]), torch.cat([txt, txt + 0.01]), torch.cat([values, values]),
                            sources=torch.arange(20).repeat(2))
    queries = bank.query_keys(img, txt)
    _, with_self = bank.search(queries, k=2)
    assert with_self[:, 0].tolist() == list(range(20))  # without exclusion, self is the best match
    scores, index = bank.search(queries, k=3, exclude=torch.arange(20))
    assert not (bank.sources[index] == torch.arange(20)[:, None]).any()
    assert (scores < 0.99).all()
    with pytest.raises(ThinklingError, match="top_k 39 but the bank has 38"):
        bank.search(queries, k=39, exclude=torch.arange(20))


def test_build_is_deterministic_and_save_load_is_exact(tmp_path):
    img, txt, values = features(30)
    bank = MemoryBank.build(img, txt, values, meta={"encoder": "toy"})
    again = MemoryBank.build(img, txt, values, meta={"encoder": "toy"})
    assert torch.equal(bank.keys, again.keys) and torch.equal(bank.values, again.values)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = MemoryBank.load(path)
    for name in ("keys", "values", "sources"):
        assert torch.equal(getattr(loaded, name), getattr(bank, name))
    assert (loaded.image_weight, loaded.text_weight, loaded.meta) == (0.4, 0.6, {"encoder": "toy"})
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temporary file left
    q = bank.query_keys(*features(3, seed=2)[:2])
    assert torch.equal(bank.search(q, 4)[1], loaded.search(q, 4)[1])
    (tmp_path / "bad.safetensors").write_bytes(b"not tensors")
    with pytest.raises(ThinklingError, match="bad.safetensors: not a TinyAlign memory bank"):
        MemoryBank.load(tmp_path / "bad.safetensors")


def test_memory_tokens_follow_the_image_tokens_and_carry_gradient():
    img, txt, values = features(40)
    bank = MemoryBank.build(img, txt, values)
    torch.manual_seed(0)
    align = TinyAlign(MLPConnector(), bank, lm_dim=16, top_k=3)
    x_img, x_txt = img[:4].requires_grad_(), txt[:4]
    out = align(x_img, x_txt, exclude=torch.arange(4))
    assert out.shape == (4, 5 + 3, 16)
    assert torch.equal(out[:, :5], align.connector(x_img))
    _, index = align.retrieve(x_img, x_txt, exclude=torch.arange(4))
    assert torch.allclose(out[:, 5:], align.memory_connector(values[index]))
    out.pow(2).sum().backward()
    for p in align.memory_connector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in align.connector.parameters())
    assert not bank.values.requires_grad and bank.values.grad is None


def test_labels_ignore_image_and_memory_tokens():
    img, txt, values = features(10)
    torch.manual_seed(0)
    align = TinyAlign(MLPConnector(), MemoryBank.build(img, txt, values), lm_dim=16, top_k=2)
    prefix = align(img[:2], txt[:2])
    text = torch.randn(2, 6, 16)
    labels = torch.tensor([[1, 2, 3, IGNORE_INDEX, 4, 5], [6, 7, 8, 9, 10, 11]])
    inputs, spliced, mask = splice_prefix(prefix, text, labels, torch.tensor([[1] * 6, [1] * 5 + [0]]))
    assert inputs.shape == (2, 7 + 6, 16) and torch.equal(inputs[:, :7], prefix)
    assert (spliced[:, :7] == IGNORE_INDEX).all() and torch.equal(spliced[:, 7:], labels)
    assert mask[:, :7].all() and mask[1, -1] == 0
    # a loss over the spliced sequence equals the loss over the text positions alone
    head = nn.Linear(16, 12)
    logits = head(inputs)
    full = F.cross_entropy(logits.flatten(0, 1), spliced.flatten(), ignore_index=IGNORE_INDEX)
    text_only = F.cross_entropy(head(text).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert full.item() == pytest.approx(text_only.item(), abs=1e-6)
    grad = torch.autograd.grad(full, prefix, allow_unused=True)[0]  # no loss on a prefix position
    assert grad is None or not grad.abs().any()
