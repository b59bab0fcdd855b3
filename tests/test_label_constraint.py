"""CASC's label constraint (Eqs. 10-12) as a switch (zoo.methods.label_constraint): on, it gives CASC's label loss
on the same attended vectors (checked against a slow per-pair computation); off, the method is unchanged."""
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import write_split
from datamodules import PrecompDataModule
from zoo.blocks import triplet_ranking_loss
from zoo.methods import CASC, CASCBase, scan_model
from zoo.methods.label_constraint import LABEL_DEFAULTS, label_settings

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(vocab_size=20, feature_dim=6, embed_dim=5, word_dim=4, fold_size=None)


def _emb(n=3, regions=3, lengths=(4, 2, 3), d=5):
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor(lengths)
    v = F.normalize(torch.randn(n, regions, d, generator=g), dim=-1)
    t = F.normalize(torch.randn(n, max(lengths), d, generator=g), dim=-1)
    t = t * (torch.arange(max(lengths))[None, :] < lens[:, None])[..., None]  # padding exactly 0, as the encoder's
    return {"regions": v, "image_ids": torch.arange(n)}, {"words": t, "lengths": lens, "caption_ids": torch.arange(n)}


def _slow_label_loss(head, v, t, lengths, y, pw, lam_i2t, lam_t2i, alpha):
    """Eqs. (10)-(11) written out per pair: attention by loops, A^I / A^T, the two-layer head, the weighted BCE."""
    def attention(query, context, lam):  # clipped-l2 over the queries, softmax (x lam) over the context
        s = torch.tensor([[F.cosine_similarity(q, k, dim=0).item() for k in context] for q in query])
        s = F.leaky_relu(s, 0.1)
        s = s / s.norm(dim=0, keepdim=True).clamp_min(1e-8)
        return torch.softmax(lam * s, dim=1)

    total = 0.0
    n_terms = 0
    for n in range(v.shape[0]):
        words = t[n, : int(lengths[n])]
        a_img = (attention(words, v[n], lam_t2i) @ v[n]).mean(0)  # Eq. (10): mean over words of a^V_j
        a_txt = (attention(v[n], words, lam_i2t) @ words).mean(0)  # mean over regions of a^T_i
        for a in (a_img, a_txt):
            h = torch.tanh(head.fc1.weight @ a + head.fc1.bias)
            logits = head.fc2.weight @ h + head.fc2.bias
            for c in range(y.shape[1]):
                s = 1 / (1 + math.exp(-logits[c].item()))
                total -= pw[c].item() * y[n, c].item() * math.log(s) + (1 - y[n, c].item()) * math.log(1 - s)
        n_terms += y.shape[1]
    return alpha * total / n_terms  # released reduction: mean over batch x labels per prediction, both summed


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_switch_gives_cascs_label_loss_on_the_same_attended_vectors(direction, f64):
    lam = 9.0 if direction == "t2i" else 4.0
    if direction == "both":
        on = CASCBase(direction="both", lambda_i2t=4.0, lambda_t2i=9.0, label_constraint=True,
                      label_settings={"num_labels": 7, "hidden": 3}, **SMALL)
    else:
        on = scan_model(direction, "mean", lam, label_constraint=True, label_settings={"num_labels": 7, "hidden": 3},
                        **SMALL)
    hp = on.hparams
    casc = CASC(num_labels=7, label_hidden=3, direction=direction, lambda_i2t=hp.lambda_i2t, lambda_t2i=hp.lambda_t2i,
                aggregation_i2t="mean", aggregation_t2i="mean", **SMALL)
    casc.label_head.load_state_dict(on.label_constraint.head.state_dict())
    pw = torch.arange(1.0, 8.0)
    on.label_constraint.pos_weight.copy_(pw)
    casc.pos_weight.copy_(pw)
    img, cap = _emb()
    y = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0, 0]])
    batch = {"image_ids": torch.arange(3), "labels": y}
    got = on.training_losses(batch, img, cap)
    assert set(got) == {"triplet", "label"}
    assert torch.equal(got["label"], casc.training_losses(batch, img, cap)["label"])  # one formula, one place
    slow = _slow_label_loss(on.label_constraint.head, img["regions"], cap["words"], cap["lengths"], y, pw,
                            hp.lambda_i2t, hp.lambda_t2i, 10.0)
    assert got["label"].item() == pytest.approx(slow, rel=1e-9)
    # the triplet term is the method's own, on its own score
    assert torch.equal(got["triplet"], triplet_ranking_loss(on.score(img, cap), on.margin, True, batch["image_ids"]))
    # options reach the loss: no positive weights, literal sum
    on.label_constraint.positive_weights, on.label_constraint.reduction = False, "sum"
    slow_sum = _slow_label_loss(on.label_constraint.head, img["regions"], cap["words"], cap["lengths"], y,
                                torch.ones(7), hp.lambda_i2t, hp.lambda_t2i, 10.0) * 7 * 3
    assert on.training_losses(batch, img, cap)["label"].item() == pytest.approx(slow_sum, rel=1e-9)


def test_off_is_the_method_unchanged():
    torch.manual_seed(0)
    plain = scan_model("t2i", "mean", 9.0, **SMALL)
    torch.manual_seed(0)
    off = scan_model("t2i", "mean", 9.0, label_constraint=False, **SMALL)
    sd_plain, sd_off = plain.state_dict(), off.state_dict()
    assert list(sd_plain) == list(sd_off) and all(torch.equal(sd_plain[k], sd_off[k]) for k in sd_plain)
    assert off.required_inputs == () and off.label_constraint is None and not off.uses_label_constraint
    img, cap = _emb(d=5)
    batch = {"image_ids": torch.arange(3)}
    losses = off.training_losses(batch, img, cap)
    assert set(losses) == {"triplet"}
    assert torch.equal(losses["triplet"], triplet_ranking_loss(plain.score(img, cap), 0.2, True, batch["image_ids"]))
    opt = off.configure_optimizers()
    assert len(opt["optimizer"].param_groups) == 1
    assert isinstance(opt["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    # and CASC itself never turns the mixin on
    casc = CASC(num_labels=3, **SMALL)
    assert not casc.uses_label_constraint and casc.label_constraint is None


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown label_settings"):
        CASCBase(label_constraint=True, label_settings={"alfa": 1.0}, **SMALL)
    with pytest.raises(ValueError, match="label_constraint is false"):
        CASCBase(label_settings={"alpha": 1.0}, **SMALL)
    with pytest.raises(ValueError, match="reduction"):
        label_settings({"reduction": "max"})
    with pytest.raises(ValueError, match="at least one label"):
        label_settings({"num_labels": 0})
    with pytest.raises(ValueError, match="true or false"):
        CASCBase(label_constraint="yes", **SMALL)
    assert label_settings(None) == LABEL_DEFAULTS
    m = CASCBase(label_constraint=True, **SMALL)  # no dictionary yet: a clear error at the first training step
    img, cap = _emb()
    with pytest.raises(RuntimeError, match="data.with_labels"):
        m.training_losses({"image_ids": torch.arange(3), "labels": torch.zeros(3, 2)}, img, cap)


def test_trains_from_labelled_data_saves_and_reloads(tmp_path):
    root = tmp_path / "d"
    caps = ["a dog runs on the grass ."] * 3 + ["a dog and a ball .", "the dog sleeps ."] + \
        ["a cat sits on a chair ."] * 4 + ["a cat ."]
    write_split(root, "train", n_images=2, captions=caps)
    write_split(root, "dev", n_images=2, captions=caps, seed=1)
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, with_labels=True, num_labels=4, num_workers=0,
                           batch_size=10, vocab_min_count=1, test_split="dev")
    dm.prepare_data()
    model = scan_model("t2i", "mean", 9.0, feature_dim=8, embed_dim=8, word_dim=4, fold_size=None,
                       label_constraint=True, label_settings={"hidden": 4})
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, enable_checkpointing=False)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, **kw)
    trainer.fit(model, dm)
    assert model.label_constraint.num_labels == 4 and model.label_words == dm.labels.words
    assert torch.equal(model.label_constraint.pos_weight, dm.label_pos_weights.float())
    opt = trainer.optimizers[0]
    assert [g["lr"] for g in opt.param_groups] == [model.lr, 0.01]  # the head's own group (CASC's released lr)
    assert model.hparams.label_settings == {"hidden": 4}  # as given: a resume compares it with the recipe's
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = CASCBase.load_from_checkpoint(str(ckpt))
    assert loaded.label_constraint.num_labels == 4 and loaded.label_words == dm.labels.words
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    L.Trainer(**kw).test(loaded, dm, verbose=False)
    assert math.isfinite(loaded.last_metrics["all"]["rsum"])
