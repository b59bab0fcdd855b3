"""CASC (Eqs. 10-13): blocks against slow hand computations, the label data, leak safety, the beta sweep,
and every ablation row from its recipe."""
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import fit_and_test_tiny, write_split
from datamodules import DataError, PrecompDataModule
from datamodules.labels import STOPWORDS, LabelVocabulary
from datamodules.parsing import UPOS_ID
from zoo.engine.evaluation import score_blockwise
from zoo.blocks import i2t_similarity, region_word_scores, t2i_similarity
from zoo.blocks.attention import paired_global_weights
from zoo.blocks.semantic import (LabelHead, fuse, global_label_similarity_labels, local_similarity,
                                 max_local_similarity, mean_pooled_cosine, weighted_label_bce)
from zoo.methods import CASC, CASCBase

ROOT = Path(__file__).resolve().parents[1]
# CASC's own rows: rows of another method's recipe (`row:`, the baselines of Tables III/VII) are parsed with their
# recipes in test_ablate, and each of those recipes trains in its method's tests
ROWS = sorted(p for p in (ROOT / "recipes" / "ablations" / "casc").rglob("*.yaml")
              if not p.name.startswith("_") and "row" not in (yaml.safe_load(p.read_text()) or {}))


def _model(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=20, num_labels=7, feature_dim=6, embed_dim=5, word_dim=4, label_hidden=3, fold_size=None)
    args.update(kw)
    return CASC(**args)


def _random_emb(model, n_img=3, n_cap=4, regions=3, lengths=(4, 2, 3, 4)):
    g = torch.Generator().manual_seed(1)
    d = model.hparams.embed_dim
    v = F.normalize(torch.randn(n_img, regions, d, generator=g), dim=-1)
    L_ = max(lengths)
    lens = torch.tensor(lengths)
    t = F.normalize(torch.randn(n_cap, L_, d, generator=g), dim=-1)
    t = t * (torch.arange(L_)[None, :] < lens[:, None])[..., None]  # padding is exactly 0, as the encoder's
    img = {"regions": v, "image_ids": torch.arange(n_img)}
    cap = {"words": t, "lengths": lens, "caption_ids": torch.arange(n_cap)}
    if model.label_head is not None:
        img["regions_proj"] = model.label_head.project(v)
        cap["words_proj"] = model.label_head.project(t)
    return img, cap


# ---- slow references --------------------------------------------------------------------------------------------
def _softmax_attention(query, context, smooth):
    """alpha[q, k] for one pair, written out: clipped-l2 normalisation of s over the queries, softmax over context."""
    s = torch.stack([torch.stack([F.cosine_similarity(qv, kv, dim=0) for kv in context]) for qv in query])  # [Q, K]
    s = F.leaky_relu(s, 0.1)
    s = s / s.norm(dim=0, keepdim=True).clamp_min(1e-8)
    return torch.softmax(smooth * s, dim=1)


def _slow_pair_vectors(v, t, lam1, lam2):
    """A^I and A^T of Eq. (10) for one (image, caption) pair with only real words, materialised."""
    a_v = _softmax_attention(t, v, lam2) @ v  # each word attends over regions -> attended region vectors [l, d]
    a_t = _softmax_attention(v, t, lam1) @ t  # each region attends over words -> attended word vectors [k, d]
    return a_v.mean(0), a_t.mean(0)


# ---- blocks ---------------------------------------------------------------------------------------------------------
def test_label_head_and_weighted_bce_against_hand_computation(f64):
    torch.manual_seed(0)
    head = LabelHead(4, 3, hidden=5)
    x = torch.randn(2, 4)
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    p = torch.tensor([0.5, 2.0, 7.0])
    w1, b1, w2, b2 = head.fc1.weight, head.fc1.bias, head.fc2.weight, head.fc2.bias
    logits = head(x)
    for n in range(2):  # two layers with tanh between, written out
        h = [math.tanh(sum(w1[j, i].item() * x[n, i].item() for i in range(4)) + b1[j].item()) for j in range(5)]
        for c in range(3):
            assert logits[n, c].item() == pytest.approx(sum(w2[c, j].item() * h[j] for j in range(5)) + b2[c].item())
    terms = []
    for n in range(2):
        for c in range(3):
            s = 1 / (1 + math.exp(-logits[n, c].item()))
            terms.append(-(p[c].item() * y[n, c].item() * math.log(s) + (1 - y[n, c].item()) * math.log(1 - s)))
    assert weighted_label_bce(logits, y, p).item() == pytest.approx(sum(terms) / 6)  # released: mean over B x K
    assert weighted_label_bce(logits, y, p, "sum").item() == pytest.approx(sum(terms))  # Eq. (11) literally
    unweighted = weighted_label_bce(logits, y, None).item()
    assert unweighted != pytest.approx(sum(terms) / 6)  # the weights matter in this case
    # the first layer commutes with a convex combination: W (sum w v) + b = sum w (W v) + b
    w = torch.softmax(torch.randn(2), 0)
    assert torch.allclose(head.from_projected((w[:, None] * head.project(x)).sum(0)), head((w[:, None] * x).sum(0)))


def test_training_label_loss_is_alpha_times_both_predictions(f64):
    model = _model()
    img, cap = _random_emb(model, n_img=3, n_cap=3, lengths=(4, 2, 3))
    y = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0, 0]])
    model.pos_weight.copy_(torch.arange(1.0, 8.0))
    losses = model.training_losses({"image_ids": torch.arange(3), "labels": y}, img, cap)
    li, lt = model.pair_label_logits(img, cap)
    expect = 10 * (weighted_label_bce(li, y, model.pos_weight) + weighted_label_bce(lt, y, model.pos_weight))
    assert torch.allclose(losses["label"], expect)
    assert set(losses) == {"triplet", "label"}


def test_global_vectors_and_label_similarity_a_blockwise_equal_a_slow_per_pair_loop(f64):
    model = _model(lambda_i2t=4.0, lambda_t2i=9.0)
    img, cap = _random_emb(model)
    with torch.no_grad():
        _, s_g = model.score_parts(img, cap)
        blocked = score_blockwise(lambda a, b: model.score_parts(a, b)[1], img, cap, 2, 3)
        slow = torch.zeros(3, 4)
        for i in range(3):
            for c in range(4):
                n = int(cap["lengths"][c])
                a_i, a_t = _slow_pair_vectors(img["regions"][i], cap["words"][c, :n], 4.0, 9.0)
                p_i, p_t = torch.sigmoid(model.label_head(a_i)), torch.sigmoid(model.label_head(a_t))
                slow[i, c] = F.cosine_similarity(p_i, p_t, dim=0)
        # training's paired path (matched pairs = the diagonal) gives the same vectors
        li, lt = model.pair_label_logits({"regions": img["regions"]}, {k: v[:3] for k, v in cap.items()})
        for n in range(3):
            a_i, a_t = _slow_pair_vectors(img["regions"][n], cap["words"][n, : int(cap["lengths"][n])], 4.0, 9.0)
            assert torch.allclose(li[n], model.label_head(a_i)) and torch.allclose(lt[n], model.label_head(a_t))
    assert torch.allclose(s_g, slow, atol=1e-10)
    assert torch.allclose(blocked.double(), slow, atol=1e-6)  # score_blockwise keeps float32 scores


def test_padding_gives_finite_values_and_gradients():
    model = _model()
    img, cap = _random_emb(model, lengths=(2, 2, 3, 6))
    img = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in img.items()}
    s_loc, s_g = model.score_parts(img, cap)
    (s_loc.sum() + s_g.sum()).backward()
    assert torch.isfinite(s_g).all() and torch.isfinite(img["regions"].grad).all()
    w_r, w_l = paired_global_weights(img["regions"], cap["words"][:3], cap["lengths"][:3], smooth_i2t=4, smooth_t2i=9)
    assert torch.allclose(w_r.sum(-1), torch.ones(3)) and torch.allclose(w_l.sum(-1), torch.ones(3))
    assert (w_l[0, 2:] == 0).all()  # padded words carry no weight


def test_eq13_fusion_in_both_readings_and_scales(f64):
    a, b, g = torch.rand(2, 3), torch.rand(2, 3), torch.rand(2, 3)
    assert torch.allclose(fuse(local_similarity(a, b), g, 0.8), 0.8 * (a + b) / 2 + 0.2 * g)
    assert torch.allclose(fuse(local_similarity(a, b, average=False), g, 0.8), 0.8 * (a + b) + 0.2 * g)
    assert torch.equal(local_similarity(a, None), a) and torch.equal(fuse(a, None, 0.3), a)
    for fusion, scale in (("average", 0.5), ("sum", 1.0)):
        for reading in ("pair", "caption_labels"):
            model = _model(local_fusion=fusion, sg_reading=reading, beta=0.7)
            img, cap = _random_emb(model)
            cap["label_vec"] = torch.tensor([[1.0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 0], [0.0] * 7,
                                             [1, 1, 1, 0, 0, 0, 0]])[:, None, None, :]
            with torch.no_grad():
                img["label_logits"] = model.label_head(img["regions"].mean(1))
                sc = region_word_scores(img["regions"], cap["words"], cap["lengths"])
                s1 = i2t_similarity(None, None, None, smooth=4.0, agg="lse", lse_temperature=5.0, scores=sc)
                s2 = t2i_similarity(None, None, None, smooth=9.0, agg="mean", scores=sc)
                if reading == "pair":
                    s_g = model.score_parts(img, cap)[1]
                else:  # printed (b): cos(predicted labels of the image, the caption's own label vector)
                    p = torch.sigmoid(model.label_head(img["regions"].mean(1)))
                    y = cap["label_vec"][:, 0, 0]
                    s_g = torch.stack([torch.stack([F.cosine_similarity(p[i], y[c], dim=0) for c in range(4)])
                                       for i in range(3)])
                    assert torch.allclose(s_g, global_label_similarity_labels(img["label_logits"], y))
                    assert (s_g[:, 2] == 0).all()  # a caption without labels
                expect = 0.7 * scale * (s1 + s2) + 0.3 * s_g
                assert torch.allclose(model.score(img, cap), expect), (fusion, reading)


def test_ablation_scorers_against_loops(f64):
    model = _model()
    img, cap = _random_emb(model)
    v, t, lens = img["regions"], cap["words"], cap["lengths"]
    sc = region_word_scores(v, t, lens)
    s_max, s_cos = max_local_similarity(sc), mean_pooled_cosine(v, t, lens)
    for i in range(3):
        for c in range(4):
            n = int(lens[c])
            cos = torch.stack([torch.stack([F.cosine_similarity(r, w, dim=0) for w in t[c, :n]]) for r in v[i]])
            assert s_max[i, c] == pytest.approx(cos.max(1).values.mean().item())
            assert s_cos[i, c] == pytest.approx(F.cosine_similarity(v[i].mean(0), t[c, :n].mean(0), dim=0).item())


def test_casc_without_labels_scores_like_casc_base(f64):
    casc = _model(global_branch="none")
    base = CASCBase(vocab_size=20, feature_dim=6, embed_dim=5, word_dim=4, lambda_i2t=4.0, lambda_t2i=9.0,
                    aggregation_i2t="lse", aggregation_t2i="mean", lse_temperature=5.0)
    img, cap = _random_emb(casc)
    assert torch.allclose(casc.score(img, cap), base.score(img, cap))
    assert casc.required_inputs == () and _model().required_inputs == ("labels",)


@pytest.mark.parametrize("direction", ["both", "i2t", "t2i"])
def test_local_branch_fast_path_equals_the_reference_with_gradients(f64, direction):
    from zoo.blocks import reference_scoring
    model = _model(direction=direction)
    img, cap = _random_emb(model, lengths=(4, 1, 3, 2))
    for emb in (img, cap):
        for k in ("regions", "words"):
            if k in emb:
                emb[k] = emb[k].clone().requires_grad_(True)
    fast = model.score(img, cap)
    g_fast = torch.autograd.grad(fast.sum() + fast[0, 1], [img["regions"], cap["words"]])
    with reference_scoring():
        slow = model.score(img, cap)
        g_slow = torch.autograd.grad(slow.sum() + slow[0, 1], [img["regions"], cap["words"]])
    assert torch.allclose(fast, slow, atol=1e-10)
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 100, 1])
def test_sg_fused_and_per_length_paths_equal_the_padded_block(f64, chunk, monkeypatch):
    """S_G reading (a) three ways: from the fast scorer's Eq. (10) weights (evaluation; label tensors in pair
    chunks of `chunk` elements), per caption length (when gradients are on), and the reference's padded block."""
    import zoo.methods.casc as casc_module
    from zoo.blocks import reference_scoring
    from zoo.blocks import semantic

    if chunk is not None:
        monkeypatch.setitem(semantic.LABEL_CHUNK_ELEMENTS, "cpu", chunk)  # 20 elements per pair: 5 pairs, 1 pair
    calls = []
    monkeypatch.setattr(casc_module, "pair_label_cosine",
                        lambda *a, **k: calls.append(1) or semantic.pair_label_cosine(*a, **k))
    model = _model()
    img, cap = _random_emb(model, n_img=3, n_cap=6, lengths=(4, 1, 3, 4, 2, 3))
    with torch.no_grad():
        _, fused = model.score_parts(img, cap)
    assert calls, "evaluation did not take the fused path"
    _, grouped = model.score_parts(img, cap)  # gradients on: weights per caption length
    assert len(calls) == 1
    with reference_scoring(), torch.no_grad():  # one call over the whole padded block
        _, padded = model.score_parts(img, cap)
    assert grouped.shape == fused.shape == (3, 6)
    assert torch.allclose(grouped, padded, atol=1e-12) and torch.allclose(fused, padded, atol=1e-12)


def test_label_head_has_its_own_schedule():
    model = _model(lr=1e-3, lr_decay_epochs=2, lr_decay=0.1)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model.label_head.parameters()}
    seen = []
    for epoch in range(8):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        opt.step()
        sched.step()
    for e, (enc, head) in enumerate(seen):
        assert enc == pytest.approx(1e-3 * 0.1 ** (e // 2)) and head == pytest.approx(0.01 * 0.8 ** (e // 3))


# ---- labels ---------------------------------------------------------------------------------------------------------
class _Parses:
    """A stand-in ParseTable: a fixed UPOS tag per word."""

    def __init__(self, captions, tags):
        from datamodules.text import tokenize

        self.rows = [np.array([UPOS_ID[tags.get(w, "DET")] for w in tokenize(c)]) for c in captions]
        self.offsets = np.arange(len(self.rows) + 1)
        self.upos = np.concatenate(self.rows)

    def get(self, k):
        return self.rows[k], np.zeros_like(self.rows[k])


def test_label_extraction_on_known_captions():
    caps = ["a dog chases a ball .", "the dog runs .", "all dogs sleep .", "two cats .",
            "a cat on a mat .", "a cat sits .", "the cat and the dog .", "a Dog ."]
    tags = {"dog": "NOUN", "ball": "NOUN", "dogs": "NOUN", "cats": "NOUN", "cat": "NOUN", "mat": "NOUN",
            "all": "NOUN", "runs": "VERB", "chases": "VERB", "sits": "VERB", "sleep": "VERB", "two": "NUM"}
    parses = _Parses(caps, tags)
    assert "all" in STOPWORDS
    voc = LabelVocabulary.build(caps, parses, "nn", top_k=3)
    # counts: dog 4 (surface, lower-cased; 'dogs' separate: no lemmatisation), cat 3, ball/cats/dogs/mat 1;
    # 'all' is tagged NOUN here but is a stopword
    assert voc.words == ["dog", "cat", "ball"]
    assert LabelVocabulary.build(caps, parses, "nn", top_k=10, stopwords=False).words[:3] == ["dog", "cat", "all"]
    assert LabelVocabulary.build(caps, parses, "vb", top_k=2).words == ["chases", "runs"]
    assert LabelVocabulary.build(caps, parses, "cd", top_k=5).words == ["two"]
    per_caption = [x.tolist() for x in voc.caption_labels(caps, parses)]
    assert per_caption == [[0, 2], [0], [], [], [1], [1], [0, 1], [0]]  # each caption's own words only
    per_image = [x.tolist() for x in voc.image_labels(caps, parses, 4)]
    assert per_image == [[0, 2], [0, 1]]  # union over the image's captions
    # p_c = #neg / #pos over images: dog in 2 of 2 -> 0; cat in 1 -> 1; ball in 1 -> 1
    assert voc.positive_weights([np.array([0, 2]), np.array([0, 1])]).tolist() == [0.0, 1.0, 1.0]
    assert voc.positive_weights([np.array([0]), np.array([0]), np.array([0, 1]), np.array([1])]).tolist() == \
        pytest.approx([1 / 3, 1.0, 3.0])
    with pytest.raises(DataError, match="lemmatisation is not available"):
        LabelVocabulary.build(caps, parses, lemmatize=True)


def _label_data(tmp_path, captions=None, **kw):
    root = tmp_path / "d"
    caps = captions or (["a dog runs on the grass ."] * 3 + ["a dog and a ball .", "the dog sleeps ."]
                        + ["a cat sits on a chair ."] * 4 + ["a cat ."])
    write_split(root, "train", n_images=2, captions=caps)
    write_split(root, "dev", n_images=2, captions=caps, seed=1)
    args = dict(num_regions=4, feature_dim=8, with_labels=True, num_labels=4, num_workers=0, batch_size=10,
                vocab_min_count=1)
    args.update(kw)
    dm = PrecompDataModule(str(root), **args)
    dm.prepare_data()
    return root, dm


def test_label_artifact_records_its_source_and_is_rebuilt_when_it_changes(tmp_path):
    import json

    root, dm = _label_data(tmp_path)
    dm.setup("fit")
    meta = json.loads(dm.label_path.read_text())["meta"]
    assert meta["parser"] == "spacy" and meta["top_k"] == 4 and meta["stopwords"] is True and len(meta["captions_digest"]) == 40
    assert dm.labels.words == ["cat", "dog", "chair", "grass"]
    # p_c over the 2 training images: cat 1 pos 1 neg, dog 1/1, chair 1/1, grass 1/1
    assert dm.label_pos_weights.tolist() == [1.0, 1.0, 1.0, 1.0]
    batch = next(iter(dm.val_dataloader()))
    assert batch["caption_labels"][:5].tolist() == [[0, 1, 0, 1]] * 3 + [[0, 1, 0, 0], [0, 1, 0, 0]]
    # new training captions: the cached dictionary is stale and rebuilt, not reused
    new = ["a horse on a hill ."] * 5 + ["a horse and a cow ."] * 5
    (root / "train_caps.txt").write_text("\n".join(new) + "\n")
    for f in root.glob("train_parse*"):
        f.unlink()
    dm2 = PrecompDataModule(str(root), num_regions=4, feature_dim=8, with_labels=True, num_labels=4, num_workers=0,
                            vocab_min_count=1, label_counts_from="train")
    dm2.prepare_data()
    assert dm2.labels.words == ["horse", "cow", "hill"]
    assert dm2.label_pos_weights.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(DataError, match="lemmatisation"):
        PrecompDataModule(str(root), with_labels=True, label_lemmatize=True)


def test_label_assignment_switch_on_a_caption_where_a_dictionary_word_is_not_a_noun():
    """Released (Code_CASC data.py:72-76): any token in the dictionary gives its label, whatever its tag there;
    'pos': only where that caption tags it as one of the dictionary's parts of speech."""
    caps = ["a sign on a wall .", "a sign by a wall .", "people sign papers .", "a wall ."]
    tags = {"sign": "NOUN", "wall": "NOUN", "papers": "NOUN", "people": "NOUN"}
    parses = _Parses(caps, tags)
    parses.rows[2] = np.array([UPOS_ID["NOUN"], UPOS_ID["VERB"], UPOS_ID["NOUN"], UPOS_ID["PUNCT"]])  # 'sign' a verb
    released = LabelVocabulary.build(caps, parses, "nn", top_k=2)
    assert released.words == ["wall", "sign"] and released.assignment == "dictionary"  # counted as nouns only (2)
    assert [x.tolist() for x in released.caption_labels(caps, parses)] == [[0, 1], [0, 1], [1], [0]]
    tagged = LabelVocabulary.build(caps, parses, "nn", top_k=2, assignment="pos")
    assert [x.tolist() for x in tagged.caption_labels(caps, parses)] == [[0, 1], [0, 1], [], [0]]
    assert [x.tolist() for x in released.image_labels(caps, parses, 2)] == [[0, 1], [0, 1]]
    assert [x.tolist() for x in tagged.image_labels(caps, parses, 2)] == [[0, 1], [0]]


def test_label_dictionary_counted_over_train_and_dev_as_released(tmp_path):
    """Released (Code_CASC vocab.py:65-85): nouns counted over the train and dev captions; 'train' = train only."""
    caps = ["a dog on grass ."] * 5 + ["a dog and a ball ."] * 5
    dev = ["a horse and a horse ."] * 5 + ["a horse on a hill ."] * 5  # nouns the training captions lack
    tags = {"dog": "NOUN", "grass": "NOUN", "ball": "NOUN", "horse": "NOUN", "hill": "NOUN"}
    both = LabelVocabulary.build(caps, _Parses(caps, tags), "nn", top_k=3, extra=[(dev, _Parses(dev, tags))])
    assert both.words == ["horse", "dog", "ball"]  # horse 15, dog 10, ball 5 = grass 5 = hill 5 (by name)
    assert LabelVocabulary.build(caps, _Parses(caps, tags), "nn", top_k=3).words == ["dog", "ball", "grass"]
    # through the datamodule: the two settings are two artifacts, the default is the released one
    root = tmp_path / "d"
    write_split(root, "train", n_images=2, captions=caps)
    write_split(root, "dev", n_images=2, captions=dev, seed=1)
    words = {}
    for counts in ("train+dev", "train"):
        dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, with_labels=True, num_labels=3, num_workers=0,
                               vocab_min_count=1, label_counts_from=counts)
        dm.prepare_data()
        words[counts] = dm.labels.words
        assert dm.labels.pos_weights.shape == (len(dm.labels),)  # over the training images only
    assert "horse" in words["train+dev"] and "horse" not in words["train"]
    assert PrecompDataModule(str(root), with_labels=True).label_counts_from == "train+dev"
    with pytest.raises(DataError, match="label_counts_from"):
        PrecompDataModule(str(root), with_labels=True, label_counts_from="dev")
    with pytest.raises(DataError, match="label_assignment"):
        PrecompDataModule(str(root), with_labels=True, label_assignment="nouns")


@pytest.mark.parametrize("bad", [0, -3])
def test_num_labels_below_one_is_an_error(bad, tmp_path):
    """Issue 19.2: -3 used to slice off the last three words silently."""
    with pytest.raises(DataError, match="num_labels must be a whole number of at least 1"):
        PrecompDataModule(str(tmp_path), with_labels=True, num_labels=bad)
    with pytest.raises(ValueError, match="at least one label"):
        _model(num_labels=bad)


# ---- leak safety ----------------------------------------------------------------------------------------------------
NOUNS = ["dog", "cat", "ball", "car", "man", "grass"]


class _Leaky(CASC):
    """What must never happen: S_G read from the image's label set served on the test split."""

    def encode_images(self, batch):
        out = super().encode_images(batch)
        out["label_logits"] = 20 * batch["labels"] - 10
        return out


def _leak_case(tmp_path):
    root = tmp_path / "leak"
    # image i's five captions each name one different noun: the union over them (the image's "label set")
    # identifies the image, a single caption's own words do not
    caps = lambda n, shift: [f"a {NOUNS[(i + c + shift) % 6]} ." for i in range(n) for c in range(5)]  # noqa: E731
    write_split(root, "train", n_images=6, captions=caps(6, 0))
    write_split(root, "dev", n_images=6, seed=1, captions=caps(6, 0))
    write_split(root, "test", n_images=6, seed=2, captions=caps(6, 0))
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, with_labels=True, num_labels=6, num_workers=0,
                           batch_size=10, eval_batch_size=3, vocab_min_count=1, val_max_images=None)
    dm.prepare_data()
    return dm


def _test_metrics(model, dm):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(model, dm, verbose=False)
    return model.last_metrics


def test_no_test_split_label_set_reaches_a_score(tmp_path):
    dm = _leak_case(tmp_path)
    kw = dict(feature_dim=8, embed_dim=8, word_dim=4, fold_size=None, sg_reading="caption_labels", beta=0.0)
    results = {}
    for name, cls in (("honest", CASC), ("leaky", _Leaky)):
        for corrupt in (False, True):
            torch.manual_seed(0)
            model = cls(**kw)
            dm._datasets.clear()
            dm.setup("test")
            if corrupt:  # replace every test image's label set by the next image's
                ds = dm.dataset("test")
                ds.image_labels = ds.image_labels[1:] + ds.image_labels[:1]
            results[name, corrupt] = _test_metrics(model, dm)["all"]
    # the construction detects a leak: label sets served on the test split change a leaking model's ranking
    assert results["leaky", False]["rsum"] != results["leaky", True]["rsum"]
    # CASC never reads them
    assert results["honest", False] == results["honest", True]


# ---- beta sweep -----------------------------------------------------------------------------------------------------
def test_beta_sweep_from_one_pass_equals_separate_evaluations(tmp_path):
    dm = _leak_case(tmp_path)
    torch.manual_seed(0)
    model = CASC(feature_dim=8, embed_dim=8, word_dim=4, fold_size=3, eval_image_block=2, eval_caption_block=7,
                 beta_sweep=[0.0, 0.3, 1.0])
    dm.setup("test")
    model.configure_from_data(dm)
    with torch.no_grad():  # a fresh head predicts ~0.5 everywhere (S_G ~ 1 for every pair): make S_G informative
        model.label_head.fc1.weight.mul_(20)
        model.label_head.fc2.weight.mul_(20)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    swept = _test_metrics(model, dm)
    assert "beta0.3" in swept and "beta0.3_fold3" in swept
    for beta in (0.0, 0.3, 0.8, 1.0):  # 0.8: the run's own beta (its main metrics)
        single = CASC(feature_dim=8, embed_dim=8, word_dim=4, fold_size=3, eval_image_block=2, eval_caption_block=7,
                      beta=beta, vocab_size=dm.vocab_size, num_labels=len(dm.labels))
        single.load_state_dict(state)
        one = _test_metrics(single, dm)
        if beta == 0.8:
            assert swept["all"] == pytest.approx(one["all"]) and swept["fold3"] == pytest.approx(one["fold3"])
            continue
        assert swept[f"beta{beta:g}"] == pytest.approx(one["all"]), beta
        assert swept[f"beta{beta:g}_fold3"] == pytest.approx(one["fold3"]), beta
    assert swept["beta0"] != swept["beta1"]  # the sweep is not one number repeated


def test_evaluation_arguments_stay_out_of_checkpoint_hparams():
    # `lightning test --ckpt_path` re-applies the checkpoint's hparams over the command line: --model.beta 0.5
    # must not be silently replaced by the training value
    model = _model(beta=0.3, beta_sweep=[0.0, 1.0], sg_reading="caption_labels")
    assert not {"beta", "beta_sweep", "sg_reading"} & set(model.hparams)
    assert (model.beta, model.beta_sweep, model.sg_reading) == (0.3, [0.0, 1.0], "caption_labels")


def test_predicted_labels_average_the_top3_captions(f64):
    model = _model()
    img, cap = _random_emb(model, n_img=2, n_cap=4)
    sims = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.0, 0.5, 0.2, 0.1]])
    scores, ids = model.predict_image_labels(img, cap, top_captions=3, k=4, sims=sims)
    for i, top in enumerate(([0, 2, 3], [1, 2, 3])):
        probs = []
        for c in top:
            n = int(cap["lengths"][c])
            a_i, _ = _slow_pair_vectors(img["regions"][i], cap["words"][c, :n], 4.0, 9.0)
            probs.append(torch.sigmoid(model.label_head(a_i)))
        p = torch.stack(probs).mean(0)
        assert torch.allclose(scores[i], p.topk(4).values) and ids[i].tolist() == p.topk(4).indices.tolist()


# ---- every row from its recipe ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "ss"


@pytest.mark.parametrize("row", ROWS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_row_trains_a_step_and_evaluates(row, synth_root, tmp_path, monkeypatch):
    first = row.read_text().splitlines()[0]
    assert first.startswith("# ") and " — " in first, "a row's first line is '# <label> — <what it computes>'"
    monkeypatch.chdir(tmp_path)
    model = fit_and_test_tiny("casc_synth", synth_root, configs=[row], train_batches=1,
                              extra=["--model.init_args.label_hidden", "8", "--model.init_args.beta_sweep", "[0.0,0.5]"])
    assert isinstance(model, CASC)
    m = model.last_metrics
    assert math.isfinite(m["all"]["rsum"]) and "beta0.5" in m


def test_paper_results_table_names_our_rows():
    import csv

    with open(ROOT / "zoo" / "paper_results" / "casc.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["table", "row", "dataset", "protocol", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                       "t2i_r10", "rsum", "note"]
    stems = {(p.parent.name, p.stem.split("_", 1)[1]) for p in ROWS}
    for table, row, ds, protocol, *nums, note in rows[1:]:
        assert ds in ("f30k", "coco") and protocol in ({"test"} if ds == "f30k" else {"1k", "5k"})
        if table in {p.parent.name for p in ROWS}:
            assert (table, row) in stems or table == "table7_methods", (table, row)
        vals = [float(x) for x in nums[:6] if x]
        if nums[6]:
            assert float(nums[6]) == pytest.approx(sum(vals), abs=0.05)
    casc = [r for r in rows if r[:3] == ["table1_components", "local_attention_global_label", "f30k"]][0]
    assert casc[7] == "60.2" and "kept as printed" in casc[-1]


def test_image_label_words_reads_the_label_dictionary(tmp_path):
    dm = _leak_case(tmp_path)
    dm.setup("test")
    torch.manual_seed(0)
    model = CASC(feature_dim=8, embed_dim=8, word_dim=4, fold_size=None)
    model.configure_from_data(dm)
    out = model.image_label_words(dm, [0, 4], k=3)
    assert len(out) == 2 and all(len(r) == 3 for r in out)
    assert all(w in NOUNS and 0 < s < 1 for r in out for w, s in r)


# ---- the recipes follow the released code (Code_CASC at HEAD; issue 17) -----------------------------------------
def _printed_config(recipe: Path, capsys, monkeypatch) -> dict:
    import sys

    import yaml

    from zoo.cli import main

    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:  # --print_config exits after printing the merged config
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


RELEASED = {  # recipe -> {dotted key: released value}
    "casc_synth.yaml": {"model.init_args.lse_temperature": 5.0, "model.init_args.gradient_clipping": "per_group",
                       "trainer.gradient_clip_val": 2.0, "data.init_args.label_assignment": "dictionary",
                       "data.init_args.label_counts_from": "train+dev", "data.init_args.vocab_from": "train+dev"},
    "casc_f30k.yaml": {"model.init_args.lse_temperature": 5.0, "model.init_args.gradient_clipping": "per_group",
                      "trainer.gradient_clip_val": 2.0, "data.init_args.label_assignment": "dictionary",
                      "data.init_args.label_counts_from": "train+dev", "data.init_args.vocab_from": "train+dev"},
    "casc_coco.yaml": {"model.init_args.lse_temperature": 5.0, "model.init_args.gradient_clipping": "per_group",
                      "trainer.gradient_clip_val": 2.0, "data.init_args.label_assignment": "dictionary",
                      "data.init_args.label_counts_from": "train+dev", "data.init_args.vocab_from": "train+dev", "trainer.max_epochs": 30,
                      "model.init_args.lr_decay_epochs": 15},
    "casc_base_f30k.yaml": {"model.init_args.lse_temperature": 5.0},
    "casc_base_coco.yaml": {"model.init_args.lse_temperature": 5.0, "trainer.max_epochs": 30,
                            "model.init_args.lr_decay_epochs": 15},
}


@pytest.mark.parametrize("recipe", sorted(RELEASED))
def test_recipes_print_the_released_settings(recipe, capsys, monkeypatch):
    merged = _printed_config(ROOT / "recipes" / recipe, capsys, monkeypatch)
    for key, want in RELEASED[recipe].items():
        node = merged
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node == want, f"{recipe}: {key} = {node!r}, released {want!r}"
    if merged["model"]["class_path"] == "zoo.methods.CASC":  # the best checkpoint by the local score, as released
        ckpt = [c for c in merged["trainer"]["callbacks"] if c["class_path"].endswith("ZooCheckpoint")]
        assert len(ckpt) == 1 and ckpt[0]["init_args"]["monitor"] == "val_local/rsum", recipe
        assert merged["trainer"]["callbacks"][-1] is ckpt[0], "last, so --trainer.callbacks.init_args.monitor reaches it"


def test_casc_defaults_to_the_released_lse_temperature():
    assert CASC().hparams.lse_temperature == 5.0


SHRINK_SYNTH = ["--data.init_args.n_train", "20", "--data.init_args.n_dev", "4", "--data.init_args.n_test", "4",
                "--data.init_args.feature_dim", "16", "--data.init_args.num_regions", "4",
                "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
                "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "4",
                "--model.init_args.feature_dim", "16", "--model.init_args.embed_dim", "8",
                "--model.init_args.word_dim", "4", "--model.init_args.label_hidden", "8"]


def test_best_checkpoint_is_selected_on_the_local_score_as_released(synth_root, tmp_path, monkeypatch):
    """val_local/rsum = the validation rsum of S_loc alone (beta = 1), and the recipes' checkpoint monitor."""
    from zoo.cli import ZooCLI
    from zoo.engine.module import RetrievalModule

    monkeypatch.chdir(tmp_path)
    cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(ROOT / "recipes" / "casc_synth.yaml"), "--data.init_args.root", str(synth_root),
                       *SHRINK_SYNTH, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                       "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                       "--trainer.num_sanity_val_steps", "0", "--trainer.accelerator", "cpu"])
    assert cli.trainer.checkpoint_callback.monitor == "val_local/rsum"
    cli.trainer.fit(cli.model, cli.datamodule)
    logged = cli.trainer.callback_metrics
    assert {"val/rsum", "val_local/rsum"} <= set(logged)
    assert float(cli.trainer.checkpoint_callback.best_model_score) == pytest.approx(float(logged["val_local/rsum"]))
    model = cli.model
    model.beta = 1.0  # the local score alone, through the ordinary evaluation
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (out,) = trainer.validate(model, cli.datamodule, verbose=False)
    assert out["val/rsum"] == pytest.approx(float(logged["val_local/rsum"]), abs=1e-4)
    assert out["val_local/rsum"] == pytest.approx(out["val/rsum"], abs=1e-4)


def test_every_row_has_the_local_monitor_key(f64):
    """Rows with one score part (CASC-base: no S_G; row 4: S_G alone) report their score as `local`."""
    for kw in ({"global_branch": "none"}, {"local": "none"}, {}):
        model = _model(**kw)
        model.caps_per_image = 1
        img, cap = _random_emb(model, n_cap=3, lengths=(4, 2, 3))
        model.trainer = L.Trainer(accelerator="cpu", logger=False)  # not testing: validation's extra key
        res = model.evaluate_embeddings(img, cap, torch.arange(3), torch.arange(3), 3)
        model.beta = 1.0
        assert res["local"] == (res["all"] if kw else model.evaluate_embeddings(img, cap, torch.arange(3),
                                                                                torch.arange(3), 3)["all"]), kw


@pytest.mark.parametrize("how", ["per_group", "joint"])
def test_per_group_clipping_a_large_head_gradient_leaves_the_encoder_step(how):
    """Released (Code_CASC model.py:493-495): encoders and label head clipped to norm 2 each."""
    model = _model(gradient_clipping=how)
    model.trainer = L.Trainer(accelerator="cpu", logger=False, gradient_clip_val=2.0)
    opt = model.configure_optimizers()["optimizer"]
    enc, head = opt.param_groups[0]["params"], opt.param_groups[1]["params"]
    assert {id(p) for p in head} == {id(p) for p in model.label_head.parameters()}
    g = torch.Generator().manual_seed(0)
    for params, norm in ((enc, 1.0), (head, 1000.0)):  # encoders below the limit, the head far above it
        grads = [torch.randn(p.shape, generator=g) for p in params]
        total = torch.cat([x.flatten() for x in grads]).norm()
        for p, x in zip(params, grads):
            p.grad = x * (norm / total)
    enc_before = [p.grad.clone() for p in enc]
    model.configure_gradient_clipping(opt, 2.0, "norm")
    group_norm = lambda ps: float(torch.cat([p.grad.flatten() for p in ps]).norm())  # noqa: E731
    if how == "per_group":
        assert all(torch.equal(p.grad, b) for p, b in zip(enc, enc_before))  # 1.0 < 2: untouched
        assert group_norm(head) == pytest.approx(2.0, rel=1e-4)
    else:  # one norm over both: the head's 1000 shrinks the encoders' gradient about 500 times
        assert group_norm(enc) == pytest.approx(1.0 * 2.0 / math.hypot(1.0, 1000.0), rel=1e-3)
        assert math.hypot(group_norm(enc), group_norm(head)) == pytest.approx(2.0, rel=1e-4)


def test_another_label_dictionary_is_refused_at_test_resume_and_load(tmp_path):
    """Issue 19.1: the dictionary was compared by size only (nn vs vb words of one size ran and scored)."""
    _, dm = _label_data(tmp_path, num_labels=2, label_counts_from="train", test_split="dev")
    _, other = _label_data(tmp_path, num_labels=2, label_counts_from="train", test_split="dev", label_pos="vb")
    assert len(dm.labels) == len(other.labels) == 2 and dm.labels.words != other.labels.words
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, enable_checkpointing=False)
    model = CASC(feature_dim=8, embed_dim=8, word_dim=4, label_hidden=4, fold_size=None)
    L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, **kw).fit(model, dm)
    trainer = L.Trainer(max_epochs=1, **kw)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "casc.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["zoo_data"]
    assert saved["label_words"] == dm.labels.words and saved["label_assignment"] == "dictionary"
    fresh = lambda: CASC(feature_dim=8, embed_dim=8, word_dim=4, label_hidden=4, fold_size=None)  # noqa: E731
    with pytest.raises(DataError, match="label dictionary is not the one the checkpoint was trained with"):
        L.Trainer(**kw).test(fresh(), other, ckpt_path=str(ckpt), verbose=False)
    with pytest.raises(DataError, match="label dictionary is not the one"):
        L.Trainer(max_epochs=2, limit_train_batches=1, **kw).fit(fresh(), other, ckpt_path=str(ckpt))
    loaded = CASC.load_from_checkpoint(str(ckpt))  # as zoo.engine.checkpoints.load_model (ensembles, pictures)
    with pytest.raises(DataError, match="label dictionary is not the one"):
        loaded.configure_from_data(other)
    _, tagged = _label_data(tmp_path, num_labels=2, label_counts_from="train", test_split="dev", label_assignment="pos")
    with pytest.raises(DataError, match="label_assignment"):
        L.Trainer(**kw).test(fresh(), tagged, ckpt_path=str(ckpt), verbose=False)
    L.Trainer(**kw).test(fresh(), dm, ckpt_path=str(ckpt), verbose=False)  # its own dictionary still works


def test_word_vocabulary_from_train_and_dev_as_released(tmp_path):
    """Code_CASC vocab.py:9-10 builds the word vocabulary over train + dev (data.vocab_from: train+dev)."""
    root = tmp_path / "d"
    write_split(root, "train", n_images=2, captions=["a dog on grass ."] * 10)
    write_split(root, "dev", n_images=2, captions=["a zebra on grass ."] * 10, seed=1)
    words = {}
    for source in ("train", "train+dev"):
        dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, num_workers=0, vocab_min_count=1,
                               vocab_from=source)
        dm.prepare_data()
        words[source] = set(dm.vocab.idx2word)
        assert dm.vocab_path.exists()
    assert "zebra" in words["train+dev"] and "zebra" not in words["train"] and "dog" in words["train"]
    with pytest.raises(DataError, match="vocab_from"):
        PrecompDataModule(str(root), vocab_from="dev")
