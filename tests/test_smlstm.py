"""sm-LSTM (Huang et al. CVPR 2017): the selective multimodal LSTM against a slow per-pair loop (the LSTM cell
written out), blockwise = whole grid, padding never changes a score nor makes NaN/Inf, CASC-sm's label loss,
and the recipes train and test."""
import math
from pathlib import Path

import pytest
import torch

from zoo.blocks import reference_scoring
from zoo.blocks.semantic import label_constraint_loss
from zoo.blocks.smlstm import SelectiveMultimodalLSTM
from zoo.engine.evaluation import score_blockwise
from zoo.methods import SMLSTM

from conftest import fit_and_test_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=20, feature_dim=6, embed_dim=5, word_dim=4, hidden_dim=3, fold_size=None)


def _softmax(z):
    e = [math.exp(x - max(z)) for x in z]
    return torch.tensor([x / sum(e) for x in e])


def _slow_pair(m: SelectiveMultimodalLSTM, regions, words, g_img, g_txt):
    """One pair (real regions, real words), step by step, the LSTM gates written out: (score, [(a_t, w_t)])."""
    g = torch.cat([g_img, g_txt])
    h, c = torch.zeros(m.hidden), torch.zeros(m.hidden)
    cell = m.cell
    selected = []
    for _ in range(m.steps):
        ctx_r = m.region_state.weight @ h + m.region_context.weight @ g
        ctx_w = m.word_state.weight @ h + m.word_context.weight @ g
        e_r = [float(m.region_score.weight[0] @ torch.tanh(m.region_item.weight @ a + m.region_item.bias + ctx_r)
                     + m.region_score.bias[0]) for a in regions]
        e_w = [float(m.word_score.weight[0] @ torch.tanh(m.word_item.weight @ w + m.word_item.bias + ctx_w)
                     + m.word_score.bias[0]) for w in words]
        a_t = sum(p * a for p, a in zip(_softmax(e_r), regions))
        w_t = sum(q * w for q, w in zip(_softmax(e_w), words))
        x = a_t / a_t.norm() * (w_t / w_t.norm())
        gates = cell.weight_ih @ x + cell.bias_ih + cell.weight_hh @ h + cell.bias_hh
        i, f, gg, o = gates.chunk(4)  # torch's LSTMCell order: input, forget, cell, output
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        selected.append((a_t, w_t))
    r = m.readout
    s = r[2].weight[0] @ torch.relu(r[0].weight @ h + r[0].bias) + r[2].bias[0]
    return float(s), selected


def _batch(n_img=3, n_cap=4, regions=3, lengths=(4, 2, 3, 1), feature_dim=6, vocab=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    tokens = torch.randint(1, vocab, (n_cap, max(lengths)), generator=g)
    tokens = tokens * (torch.arange(max(lengths))[None] < lens[:, None])
    return {"images": torch.rand(n_img, regions, feature_dim, generator=g), "tokens": tokens, "lengths": lens,
            "image_ids": torch.arange(n_img), "caption_ids": torch.arange(n_cap)}


def _model(**kw):
    torch.manual_seed(0)
    return SMLSTM(**{**SMALL, **kw})


def test_block_equals_a_slow_per_pair_loop_paired_and_blockwise(f64):
    model = _model().double()
    b = _batch()
    with torch.no_grad():
        img, cap = model.encode_images(b), model.encode_captions(b)
        fast = model.score(img, cap)
        slow = torch.tensor([[_slow_pair(model.smlstm, img["regions"][i], cap["words"][c, : int(b["lengths"][c])],
                                         img["global"][i], cap["global"][c])[0] for c in range(4)] for i in range(3)])
        torch.testing.assert_close(fast, slow)
        with reference_scoring():  # the per-caption path `make bench` times the grid against
            torch.testing.assert_close(model.score(img, cap), slow)
        torch.testing.assert_close(score_blockwise(model.score, img, cap, 2, 3), fast.float())  # float32 grid
        three = {k: v[:3] for k, v in cap.items()}
        paired = model._run(img, three, paired=True)
        torch.testing.assert_close(paired[:, 0], model.score(img, three).diagonal())
    assert model.hardest_negative is False


def test_padding_changes_nothing_and_stays_finite_forward_and_backward():
    model = _model()
    b = _batch(lengths=(4, 1, 3, 1))
    img, cap = model.encode_images(b), model.encode_captions(b)
    s = model.score(img, cap)
    longer = dict(b, tokens=torch.cat([b["tokens"], torch.zeros(4, 3, dtype=torch.long)], 1))
    torch.testing.assert_close(model.score(img, model.encode_captions(longer)), s)
    # padded regions through the block's region_mask: the same as dropping them
    m = model.smlstm
    words_mask = torch.arange(cap["words"].shape[1])[None] < cap["lengths"][:, None]
    padded = torch.cat([img["regions"].detach(), 1e4 * torch.ones(3, 2, 5)], 1).requires_grad_(True)
    r_mask = torch.tensor([[True] * 3 + [False] * 2] * 3)
    got = m(padded, cap["words"], words_mask, img["global"], cap["global"], region_mask=r_mask)
    torch.testing.assert_close(got, s)
    batch3 = dict(b, image_ids=torch.arange(3))
    three = model.encode_captions({k: v[:3] for k, v in b.items()})
    loss = sum(model.training_losses(batch3, model.encode_images(b), three).values())
    (loss + got.sum()).backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(padded.grad).all() and (padded.grad[:, 3:] == 0).all()


def test_bad_arguments_are_clear_errors():
    for bad in (dict(steps=0), dict(hidden_dim=0), dict(embed_dim=1.5)):
        with pytest.raises(ValueError, match="SMLSTM"):
            SMLSTM(**{**SMALL, **bad})
    m = _model()
    b = _batch()
    with pytest.raises(ValueError, match="as many captions as images"):
        m._run(m.encode_images(b), m.encode_captions(b), paired=True)


def test_casc_sm_label_loss_is_cascs_on_the_selected_vectors(f64):
    model = _model(label_constraint=True, label_settings={"num_labels": 4, "hidden": 3}).double()
    pw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    model.label_constraint.pos_weight.copy_(pw)
    b = _batch(n_img=3, n_cap=3, lengths=(4, 2, 3))
    y = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]])
    img, cap = model.encode_images(b), model.encode_captions(b)
    losses = model.training_losses(dict(b, labels=y), img, cap)
    assert set(losses) == {"triplet", "label"}
    a_img, a_txt = [], []
    for n in range(3):
        _, sel = _slow_pair(model.smlstm, img["regions"][n], cap["words"][n, : int(b["lengths"][n])],
                            img["global"][n], cap["global"][n])
        a_img.append(torch.stack([a for a, _ in sel]).mean(0))  # A^I: the mean over the T steps of a_t
        a_txt.append(torch.stack([w for _, w in sel]).mean(0))
    want = label_constraint_loss(model.label_constraint.head, torch.stack(a_img), torch.stack(a_txt), y, pw)
    torch.testing.assert_close(losses["label"], want)
    off = _model().double()
    torch.testing.assert_close(off.training_losses(b, off.encode_images(b), off.encode_captions(b))["triplet"],
                               losses["triplet"])


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth") / "ss"


@pytest.mark.parametrize("recipe", ["smlstm_synth", "casc_sm_synth", "smlstm_f30k", "smlstm_coco"])
def test_recipes_build_and_the_synth_ones_train_and_test(recipe, synth_root, tmp_path, monkeypatch):
    import yaml

    cfg = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "zoo.methods.SMLSTM" and args["steps"] == 3 and args["margin"] == 0.2
    assert args["hardest_negative"] is False
    if not recipe.endswith("synth"):
        return
    base = yaml.safe_load((ROOT / "recipes" / "casc_base_synth.yaml").read_text())
    for key in ("n_train", "n_dev", "n_test", "batch_size"):
        assert cfg["data"]["init_args"][key] == base["data"]["init_args"][key]
    assert cfg["trainer"]["max_epochs"] == base["trainer"]["max_epochs"]
    monkeypatch.chdir(tmp_path)
    model = fit_and_test_tiny(recipe, synth_root, ["--model.init_args.hidden_dim", "8"])
    assert isinstance(model, SMLSTM) and model.uses_label_constraint == (recipe == "casc_sm_synth")
