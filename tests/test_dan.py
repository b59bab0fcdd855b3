"""DAN (m-DAN, Nam et al. CVPR 2017): the attention step, the BiLSTM and the batched scorer against slow per-pair
loops; padding never changes a score nor makes NaN/Inf; CASC-DAN's label loss; the recipes train and test."""
import math
from pathlib import Path

import pytest
import torch

from zoo.blocks.dan import DANAttention, MDAN, masked_softmax
from zoo.blocks.encoders import BiLSTMTextEncoder
from zoo.blocks.semantic import label_constraint_loss
from zoo.engine.evaluation import score_blockwise
from zoo.methods import DAN

from conftest import fit_and_test_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=20, feature_dim=6, embed_dim=5, word_dim=4, hidden_dim=3, fold_size=None)


def _slow_attention(att: DANAttention, items, memory):
    """One step for one item set (real items only), written out item by item."""
    wm = torch.tanh(att.memory.weight @ memory + att.memory.bias)
    logits = []
    for x in items:
        h = torch.tanh(att.item.weight @ x + att.item.bias) * wm
        logits.append((att.score.weight[0] @ h + att.score.bias[0]).item())
    e = [math.exp(z - max(logits)) for z in logits]
    alpha = [z / sum(e) for z in e]
    return sum(a * x for a, x in zip(alpha, items)), torch.tensor(alpha)


def _slow_steps(mdan: MDAN, regions, words):
    """m-DAN for one image (real regions) and one caption (real words): the lists v^(0..K), u^(0..K)."""
    v = torch.tanh(mdan.proj[0].weight @ regions.mean(0) + mdan.proj[0].bias)
    vs, mv = [v], v
    for k in range(mdan.steps):
        ctx, _ = _slow_attention(mdan.visual[k], regions, mv)
        v = torch.tanh(mdan.proj[k + 1].weight @ ctx + mdan.proj[k + 1].bias)
        mv = mv + v
        vs.append(v)
    u = words.mean(0)
    us, mu = [u], u
    for k in range(mdan.steps):
        u, _ = _slow_attention(mdan.textual[k], words, mu)
        mu = mu + u
        us.append(u)
    return vs, us


def _slow_score(mdan, regions, words):
    vs, us = _slow_steps(mdan, regions, words)
    return sum(float(v @ u) for v, u in zip(vs, us))  # S = sum_k v^(k) . u^(k)


def _slow_joint_steps(mdan: MDAN, regions, words):
    """The joint-memory reading for one image and one caption (real items only): one memory m, started at
    v^(0) * u^(0), guides both attentions and takes v^(k) * u^(k) after each step. The lists v^(0..K), u^(0..K)."""
    v = torch.tanh(mdan.proj[0].weight @ regions.mean(0) + mdan.proj[0].bias)
    u = words.mean(0)
    vs, us, m = [v], [u], v * u
    for k in range(mdan.steps):
        ctx, _ = _slow_attention(mdan.visual[k], regions, m)
        v = torch.tanh(mdan.proj[k + 1].weight @ ctx + mdan.proj[k + 1].bias)
        u, _ = _slow_attention(mdan.textual[k], words, m)
        m = m + v * u
        vs.append(v)
        us.append(u)
    assert torch.allclose(m.sum(), sum(v @ u for v, u in zip(vs, us)))  # S is the sum of m^(K)'s entries
    return vs, us


def _batch(n_img=3, n_cap=4, regions=3, lengths=(4, 2, 3, 1), feature_dim=6, vocab=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    tokens = torch.randint(1, vocab, (n_cap, max(lengths)), generator=g)
    tokens = tokens * (torch.arange(max(lengths))[None] < lens[:, None])  # 0 = padding
    return {"images": torch.rand(n_img, regions, feature_dim, generator=g), "tokens": tokens, "lengths": lens,
            "image_ids": torch.arange(n_img), "caption_ids": torch.arange(n_cap)}


# ---- blocks ---------------------------------------------------------------------------------------------------------
def test_attention_step_against_a_slow_loop_with_padding(f64):
    torch.manual_seed(0)
    att = DANAttention(6, 5, 3)
    items, memory = torch.randn(2, 4, 6), torch.randn(2, 5)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    ctx, alpha = att(items, mask, memory)
    for b in range(2):
        n = int(mask[b].sum())
        want_ctx, want_alpha = _slow_attention(att, items[b, :n], memory[b])
        torch.testing.assert_close(ctx[b], want_ctx)
        torch.testing.assert_close(alpha[b, :n], want_alpha)
        assert (alpha[b, n:] == 0).all()
    # a memory per pair broadcasts over one item set (the joint-memory form): same as one call per pair
    pair_memory = torch.randn(2, 3, 5)
    a = att.weights(att.project_items(items)[:, None], mask[:, None], pair_memory)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(a[b, c], att(items[b : b + 1], mask[b : b + 1], pair_memory[b, c][None])[1][0])


def test_masked_softmax_has_no_nan_forward_or_backward():
    logits = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False], [True, True, True, True]])
    p = masked_softmax(logits, mask)
    assert torch.isfinite(p).all() and (p[1] == 0).all() and (p[0, 2:] == 0).all()
    torch.testing.assert_close(p.sum(-1), torch.tensor([1.0, 0.0, 1.0]))
    (p * torch.randn(3, 4)).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


def test_bilstm_encoder_equals_each_caption_alone_and_pads_with_zeros(f64):
    torch.manual_seed(0)
    enc = BiLSTMTextEncoder(20, 4, 5)
    b = _batch()
    out = enc(b["tokens"], b["lengths"])
    for c, n in enumerate(b["lengths"].tolist()):
        x = enc.embed(b["tokens"][c : c + 1, :n])
        alone, _ = enc.rnn(x)  # one caption, no padding: the directions summed
        torch.testing.assert_close(out[c, :n], alone[0, :, :5] + alone[0, :, 5:])
        assert (out[c, n:] == 0).all()


# ---- the method -----------------------------------------------------------------------------------------------------
def _model(**kw):
    torch.manual_seed(0)
    return DAN(**{**SMALL, **kw}).double()


def test_batched_score_equals_a_slow_per_pair_loop_and_is_blockwise(f64):
    model = _model()
    b = _batch()
    with torch.no_grad():
        img, cap = model.encode_images(b), model.encode_captions(b)
        fast = model.score(img, cap)
        words = model.text_encoder(b["tokens"], b["lengths"])
        slow = torch.tensor([[_slow_score(model.dan, b["images"][i], words[c, : int(b["lengths"][c])])
                              for c in range(4)] for i in range(3)])
        torch.testing.assert_close(fast, slow)
        torch.testing.assert_close(score_blockwise(model.score, img, cap, 2, 3), fast.float())  # float32 grid
    assert model.hardest_negative is False  # DAN's loss sums over negatives


@pytest.mark.parametrize("memory", ["separate", "joint"])
def test_padding_changes_nothing_and_stays_finite_forward_and_backward(memory):
    model = _model(steps=3, memory=memory).float()
    b = _batch(lengths=(4, 1, 3, 1))
    s = model.score(model.encode_images(b), model.encode_captions(b))
    # the same captions padded further (longer batch) and with junk token ids in the padding: the same scores
    longer = dict(b, tokens=torch.cat([b["tokens"], torch.zeros(4, 3, dtype=torch.long)], 1))
    torch.testing.assert_close(model.score(model.encode_images(b), model.encode_captions(longer)), s)
    # padded regions (a region_mask in the batch) are ignored: the same as dropping them
    padded = dict(b, images=torch.cat([b["images"], 1e4 * torch.ones(3, 2, 6)], 1),
                  region_mask=torch.tensor([[True] * 3 + [False] * 2] * 3))
    torch.testing.assert_close(model.score(model.encode_images(padded), model.encode_captions(b)), s)
    padded["images"].requires_grad_(True)
    loss = model.training_losses(dict(padded, image_ids=torch.arange(3)), model.encode_images(padded),
                                 model.encode_captions({k: v[:3] for k, v in b.items()}))
    total = sum(loss.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(padded["images"].grad).all() and (padded["images"].grad[:, 3:] == 0).all()


def test_joint_memory_scores_equal_a_slow_per_pair_loop_blockwise_and_paired(f64):
    model = _model(memory="joint", steps=3)
    b = _batch()
    with torch.no_grad():
        img, cap = model.encode_images(b), model.encode_captions(b)
        fast = model.score(img, cap)
        words = model.text_encoder(b["tokens"], b["lengths"])
        slow = torch.tensor([[sum(float(v @ u) for v, u in zip(*_slow_joint_steps(
            model.dan, b["images"][i], words[c, : int(b["lengths"][c])]))) for c in range(4)] for i in range(3)])
        torch.testing.assert_close(fast, slow.to(fast.dtype))
        torch.testing.assert_close(score_blockwise(model.score, img, cap, 2, 3), fast.float())
        # paired (the matched pairs of a training batch) = the grid's diagonal
        sq = _batch(n_img=3, n_cap=3, lengths=(4, 2, 3))
        i3, c3 = model.encode_images(sq), model.encode_captions(sq)
        torch.testing.assert_close(model._joint(i3, c3, paired=True)[:, 0], torch.diagonal(model.score(i3, c3)))
    # not the separate memories' score: the reading changes the model
    sep = _model(steps=3)
    assert not torch.allclose(sep.score(sep.encode_images(b), sep.encode_captions(b)), fast)
    # a search's first stage: l2(v^(0)), l2(u^(0))
    g = model.global_embedding(img, "images")
    torch.testing.assert_close(g.double(), torch.nn.functional.normalize(img["v0"], dim=-1))


@pytest.mark.parametrize("memory", ["separate", "joint"])
def test_zero_images_and_one_word_captions_stay_finite_backward(memory):
    model = _model(memory=memory).float()
    sq = _batch(n_img=3, n_cap=3, lengths=(1, 3, 1))
    sq["images"] = torch.zeros(3, 3, 6, requires_grad=True)
    loss = model.training_losses(sq, model.encode_images(sq), model.encode_captions(sq))["triplet"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sq["images"].grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_casc_dan_with_the_joint_memory_takes_each_matched_pairs_steps(f64):
    model = _model(memory="joint", label_constraint=True, label_settings={"num_labels": 4, "hidden": 3})
    b = _batch(n_img=3, n_cap=3, lengths=(4, 2, 3))
    a_img, a_txt = model.matched_attended_vectors(model.encode_images(b), model.encode_captions(b))
    words = model.text_encoder(b["tokens"], b["lengths"])
    for n in range(3):
        vs, us = _slow_joint_steps(model.dan, b["images"][n], words[n, : int(b["lengths"][n])])
        torch.testing.assert_close(a_img[n], torch.stack(vs[1:]).mean(0))
        torch.testing.assert_close(a_txt[n], torch.stack(us[1:]).mean(0))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="DAN memory must be one of"):
        DAN(**{**SMALL, "memory": "shared"})
    for bad in (dict(steps=0), dict(embed_dim=0), dict(hidden_dim=2.5)):
        with pytest.raises(ValueError, match="DAN"):
            DAN(**{**SMALL, **bad})
    with pytest.raises(RuntimeError, match="vocab_size"):
        DAN(**{**SMALL, "vocab_size": None}).encode_captions(_batch())


def test_casc_dan_label_loss_is_cascs_on_the_attended_step_vectors(f64):
    model = _model(label_constraint=True, label_settings={"num_labels": 4, "hidden": 3})
    pw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    model.label_constraint.pos_weight.copy_(pw)
    b = _batch(n_img=3, n_cap=3, lengths=(4, 2, 3))
    y = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]])
    img, cap = model.encode_images(b), model.encode_captions(b)
    losses = model.training_losses(dict(b, labels=y), img, cap)
    assert set(losses) == {"triplet", "label"}
    words = model.text_encoder(b["tokens"], b["lengths"])
    a_img, a_txt = [], []
    for n in range(3):
        vs, us = _slow_steps(model.dan, b["images"][n], words[n, : int(b["lengths"][n])])
        a_img.append(torch.stack(vs[1:]).mean(0))  # A^I: the mean of the attended v^(1..K)
        a_txt.append(torch.stack(us[1:]).mean(0))
    want = label_constraint_loss(model.label_constraint.head, torch.stack(a_img), torch.stack(a_txt), y, pw)
    torch.testing.assert_close(losses["label"], want)
    # off: the same network, no label term, the same triplet loss
    off = _model()
    assert set(off.training_losses(b, off.encode_images(b), off.encode_captions(b))) == {"triplet"}
    torch.testing.assert_close(off.training_losses(b, off.encode_images(b), off.encode_captions(b))["triplet"],
                               losses["triplet"])


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "ss"


@pytest.mark.parametrize("recipe", ["dan_synth", "casc_dan_synth", "dan_f30k", "dan_coco", "casc_dan_f30k",
                                    "casc_dan_coco"])
def test_recipes_build_and_the_synth_ones_train_and_test(recipe, synth_root, tmp_path, monkeypatch):
    import yaml

    cfg = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "zoo.methods.DAN" and args["steps"] == 2
    assert args["margin"] == (10.0 if recipe.endswith("synth") else 100.0)  # the paper's 100 on real data
    assert args["hardest_negative"] is False
    if not recipe.endswith("synth"):
        return
    base = yaml.safe_load((ROOT / "recipes" / "casc_base_synth.yaml").read_text())
    assert cfg["data"]["init_args"]["n_train"] == base["data"]["init_args"]["n_train"]
    assert cfg["trainer"]["max_epochs"] == base["trainer"]["max_epochs"]
    assert cfg["data"]["init_args"]["batch_size"] == base["data"]["init_args"]["batch_size"]
    monkeypatch.chdir(tmp_path)
    model = fit_and_test_tiny(recipe, synth_root, ["--model.init_args.hidden_dim", "8"])
    assert isinstance(model, DAN) and model.uses_label_constraint == (recipe == "casc_dan_synth")
    if recipe == "casc_dan_synth":  # the joint-memory reading trains and tests through the same loop
        model = fit_and_test_tiny(recipe, synth_root, ["--model.init_args.hidden_dim", "8",
                                                       "--model.init_args.memory", "joint"])
        assert model.joint and model.uses_label_constraint
