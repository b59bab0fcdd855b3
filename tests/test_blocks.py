"""Each block against its equation, checked by an independent slow computation (loops over pairs)."""
import math

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks import (BiGRUTextEncoder, RegionEncoder, attend, i2t_similarity, l2_normalize, normalize_scores,
                        t2i_similarity, triplet_ranking_loss)
from zoo.blocks.functional import safe_sqrt



@pytest.fixture(autouse=True)
def float64():
    """Exact comparisons against the slow references; restored so other test files keep float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _slow_direction(v, t, lam, direction, norm="clipped_l2", agg="mean", lse_t=6.0):
    """One pair, written straight from CASC Eqs. (3)-(7) with explicit attended vectors."""
    s = torch.zeros(v.shape[0], t.shape[0])
    for i in range(v.shape[0]):
        for j in range(t.shape[0]):
            s[i, j] = torch.dot(v[i], t[j]) / (v[i].norm() * t[j].norm())  # Eq. (3)
    if direction == "i2t":
        query, context, raw = v, t, s  # regions attend over words
    else:
        query, context, raw = t, v, s.T  # words attend over regions
    x = raw.clone()
    if norm == "clipped_l2":
        x = F.leaky_relu(x, 0.1)
        x = x / x.norm(dim=0, keepdim=True)  # over the query side
    scores = []
    for q in range(query.shape[0]):
        w = torch.softmax(lam * x[q], dim=0)  # over the context side, Eq. (4)/(6)
        a = (w[:, None] * context).sum(0)
        scores.append(torch.dot(query[q], a) / (query[q].norm() * a.norm()))  # Eq. (5)/(7)
    scores = torch.stack(scores)
    if agg == "mean":
        return scores.mean()
    return torch.log(torch.exp(lse_t * scores).sum()) / lse_t


def _random_batch(n_img=3, n_cap=4, regions=5, max_len=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, regions, d, generator=g)
    lengths = torch.tensor([max_len, 2, 5, 1][:n_cap])
    captions = torch.randn(n_cap, max_len, d, generator=g)
    captions[torch.arange(max_len)[None, :] >= lengths[:, None]] = 7.0  # garbage in padding must not matter
    return images, captions, lengths


@pytest.mark.parametrize("direction,lam", [("i2t", 9.0), ("t2i", 4.0)])
@pytest.mark.parametrize("agg", ["mean", "lse"])
def test_cross_attention_matches_slow_reference(direction, lam, agg):
    images, captions, lengths = _random_batch()
    fn = i2t_similarity if direction == "i2t" else t2i_similarity
    fast = fn(images, captions, lengths, smooth=lam, agg=agg)
    assert fast.shape == (3, 4)
    for i in range(3):
        for c in range(4):
            slow = _slow_direction(images[i], captions[c, : lengths[c]], lam, direction, agg=agg)
            assert fast[i, c].item() == pytest.approx(slow.item(), abs=1e-9)


def test_cross_attention_hand_computed_single_word():
    # One word: every region attends to it with weight 1, so S_I2T = mean_i cos(v_i, t).
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[1.0, 1.0]]])
    got = i2t_similarity(v, t, torch.tensor([1]))
    assert got.item() == pytest.approx(1 / math.sqrt(2))
    # T2I with lambda -> 0: uniform weights over regions, a = (0.5, 0.5), cos(t, a) = 1.
    got = t2i_similarity(v, t, torch.tensor([1]), smooth=1e-9)
    assert got.item() == pytest.approx(1.0)


def test_normalisations_differ_and_are_used():
    images, captions, lengths = _random_batch()
    a = i2t_similarity(images, captions, lengths, norm="clipped_l2")
    b = i2t_similarity(images, captions, lengths, norm="none")
    assert not torch.allclose(a, b)
    s = torch.tensor([[-1.0, 2.0], [3.0, 4.0]])
    out = normalize_scores(s, torch.ones(2, 1, dtype=torch.bool), "relu_l2", dim=-2)
    assert torch.allclose(out, torch.tensor([[0.0, 2 / math.sqrt(20)], [1.0, 4 / math.sqrt(20)]]))


def test_attend_paired_matches_weights_and_masks_padding():
    images, captions, lengths = _random_batch(n_img=4, n_cap=4)
    mask = torch.arange(captions.shape[1])[None] < lengths[:, None]
    a, w = attend(images, captions, smooth=9.0, context_mask=mask)
    assert torch.allclose(w.sum(-1), torch.ones(4, 5))
    assert (w.masked_select(~mask[:, None, :].expand_as(w)) == 0).all()
    # pair 1 (2 words): attended vector is a convex mix of its two real words
    slow_w = torch.softmax(9.0 * (lambda x: x / x.norm(dim=0, keepdim=True))(F.leaky_relu(
        l2_normalize(images[1]) @ l2_normalize(captions[1, :2]).T, 0.1)), dim=1)
    assert torch.allclose(w[1, :, :2], slow_w)
    assert torch.allclose(a[1], slow_w @ captions[1, :2])


def test_no_nan_with_padding_and_zero_vectors_forward_backward():
    images, captions, lengths = _random_batch()
    images = images.clone()
    images[0, 1] = 0.0  # an empty region
    captions = captions.clone()
    captions[2, 0] = 0.0  # a zero word vector
    images.requires_grad_(True)
    captions.requires_grad_(True)
    for agg in ("mean", "lse"):
        s = i2t_similarity(images, captions, lengths, agg=agg) + t2i_similarity(images, captions, lengths, agg=agg)
        assert torch.isfinite(s).all()
        s.sum().backward()
        assert torch.isfinite(images.grad).all() and torch.isfinite(captions.grad).all()
        # padding gets no gradient at all
        pad = torch.arange(captions.shape[1])[None] >= lengths[:, None]
        assert (captions.grad[pad] == 0).all()
    z = torch.zeros(3, requires_grad=True)
    (l2_normalize(z).sum() + safe_sqrt((z * z).sum())).backward()
    assert (z.grad == 0).all()  # not the 1/eps = 1e8 a clamped norm alone would give


def _slow_triplet(sims, margin, hardest, image_ids):
    total = 0.0
    b = len(sims)
    for n in range(b):
        cap_costs = [max(0.0, margin - sims[n][n] + sims[n][c]) for c in range(b) if image_ids[c] != image_ids[n]]
        img_costs = [max(0.0, margin - sims[n][n] + sims[m][n]) for m in range(b) if image_ids[m] != image_ids[n]]
        if hardest:
            total += max(cap_costs, default=0.0) + max(img_costs, default=0.0)
        else:
            total += sum(cap_costs) + sum(img_costs)
    return total


@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_loss_matches_slow_reference(hardest):
    g = torch.Generator().manual_seed(1)
    sims = torch.rand(5, 5, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 3])  # pairs 1 and 2 share an image: not negatives of each other
    got = triplet_ranking_loss(sims, 0.2, hardest, ids)
    assert got.item() == pytest.approx(_slow_triplet(sims.tolist(), 0.2, hardest, ids.tolist()))
    assert triplet_ranking_loss(torch.eye(3) * 5, 0.2).item() == 0.0  # well separated -> zero
    # hand-computed: positives 0.5, one negative 0.6 in each direction -> 2 * (0.2 - 0.5 + 0.6)
    s = torch.tensor([[0.5, 0.6], [0.0, 0.5]])
    assert triplet_ranking_loss(s, 0.2).item() == pytest.approx(0.3 + 0.3 + 0.0 + 0.0)


def test_encoders_shapes_norms_and_padding():
    enc = RegionEncoder(16, 8)
    v = enc(torch.randn(2, 3, 16))
    assert v.shape == (2, 3, 8) and torch.allclose(v.norm(dim=-1), torch.ones(2, 3))
    txt = BiGRUTextEncoder(vocab_size=10, word_dim=4, embed_dim=8)
    tokens = torch.tensor([[3, 4, 5], [6, 0, 0]])
    out = txt(tokens, torch.tensor([3, 1]))
    assert out.shape == (2, 3, 8)
    assert torch.allclose(out[0].norm(dim=-1), torch.ones(3))
    assert (out[1, 1:] == 0).all()
    # directions averaged: the one-word caption equals (fwd + bwd)/2 of a length-1 run, normalised
    raw, _ = txt.rnn(txt.embed(tokens[1:, :1]))
    ref = l2_normalize((raw[..., :8] + raw[..., 8:]) / 2)
    assert torch.allclose(out[1, :1], ref[0], atol=1e-6)


def test_half_precision_norms_neither_overflow_nor_divide_by_zero():
    x = torch.full((2, 1024), 20.0, dtype=torch.float16, requires_grad=True)  # sum of squares 409600 > fp16 max
    with torch.no_grad():
        x[1] = 0.0
    y = l2_normalize(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.allclose(y[0].float().norm(), torch.tensor(1.0, dtype=torch.float32), atol=1e-2)
    assert (y[1] == 0).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_scores_under_bf16_autocast_match_float32():
    images, captions, lengths = _random_batch()
    images, captions = images.float(), captions.float()
    ref = i2t_similarity(images, captions, lengths) + t2i_similarity(images, captions, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = i2t_similarity(images, captions, lengths) + t2i_similarity(images, captions, lengths)
    assert got.dtype == torch.float32  # scores stay float32: no ties manufactured by bf16 rounding
    assert torch.allclose(got, ref.float(), atol=3e-2)
