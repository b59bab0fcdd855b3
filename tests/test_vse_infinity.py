"""VSE-infinity (BiGRU) equals the official code (woodfrog/vse_infty bigru @ 8600f89) on the golden checkpoint,
and GPO equals a slow one-set-at-a-time reference."""
import copy

import numpy as np
import pytest
import torch

from datamodules.errors import DataError
from golden import golden_npz, golden_path
from zoo.blocks import GPO, slow_gpo
from zoo.engine.metrics import i2t_ranks, summarize_ranks, t2i_ranks
from zoo.methods import VSEInfinity, load_official
from zoo.methods.official import read_official
from zoo.methods.vse_infinity import augment_captions, drop_regions

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return golden_npz("vseinf_tiny_golden.npz")


@pytest.fixture(scope="module")
def model():
    return load_official("vse_infinity", golden_path("vseinf_tiny.pth.tar"))


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _close(a, b, tol=TOL):
    np.testing.assert_allclose(a.detach().double().numpy(), np.asarray(b, dtype=np.float64), atol=tol, rtol=0)


def test_gpo_equals_the_slow_reference():
    torch.manual_seed(0)
    gpo = GPO(32, 32)
    lengths = torch.tensor([7, 1, 12, 5, 12])
    x = torch.randn(5, 12, 16)
    x[torch.arange(12)[None, :] >= lengths[:, None]] = 0
    pooled, w = gpo(x, lengths)
    ref, ref_w = slow_gpo(gpo, x, lengths)
    torch.testing.assert_close(pooled, ref, atol=1e-6, rtol=1e-5)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(w[i, :n, 0], ref_w[i], atol=1e-6, rtol=1e-5)
        assert (w[i, n:] == 0).all()
    # weights depend on the set size alone; padding content never matters
    y = x.clone()
    y[torch.arange(12)[None, :] >= lengths[:, None]] = 1e3
    torch.testing.assert_close(gpo(y, lengths)[0], pooled)
    assert torch.isfinite(pooled).all()


def test_import_configures_the_model_from_opt(model):
    assert isinstance(model, VSEInfinity) and not model.training
    hp = model.hparams
    assert (hp.feature_dim, hp.embed_dim, hp.word_dim, hp.vocab_size, hp.gpo_dim) == (64, 64, 32, 50, 32)
    assert model.sum_negatives_epochs == 1 and model.lr == pytest.approx(5e-4)


def test_embeddings_sims_and_gpo_intermediates_equal_the_official(model, golden):
    x, tok, lens = _t(golden["regions"]), _t(golden["tokens"]), _t(golden["lengths"])
    with torch.no_grad():
        img, cap = model.encode_images({"images": x}), model.encode_captions({"tokens": tok, "lengths": lens})
        sims = model.score(img, cap)
        pre = model.image_encoder(x) + model.image_mlp(x)
        _, w_img = model.image_pool(pre, torch.full((6,), 36))
        words = model.text_encoder(tok, lens)
        _, w_cap = model.text_pool(words, lens)
    _close(img["vector"], golden["img_embs"])
    _close(cap["vector"], golden["cap_embs"])
    _close(img["vector"], golden["img_embs_direct"])
    _close(cap["vector"], golden["cap_embs_direct"])
    _close(sims, golden["sims"])
    _close(pre, golden["img_pre_pool"])
    _close(w_img[..., 0], golden["img_pool_weights"])
    _close(words, golden["cap_pre_pool"])
    _close(w_cap[..., 0], golden["cap_pool_weights"])


def test_variable_region_counts_equal_the_official(model, golden):
    x, n = _t(golden["regions"]).clone(), _t(golden["var_img_lengths"])
    x[torch.arange(36)[None, :] >= n[:, None]] = 0
    with torch.no_grad():
        img = model.encode_images({"images": x, "image_lengths": n})
        _, w = model.image_pool(model.image_encoder(x) + model.image_mlp(x), n)
    _close(img["vector"], golden["varlen_img_embs"])
    _close(w[..., 0], golden["varlen_img_pool_weights"])


def test_recall_arrays_equal_the_official_exactly(model, golden):
    with torch.no_grad():
        sims = model.score(model.encode_images({"images": _t(golden["regions"])}),
                           model.encode_captions({"tokens": _t(golden["tokens"]), "lengths": _t(golden["lengths"])}))
    ri, rt = i2t_ranks(sims), t2i_ranks(sims)
    np.testing.assert_array_equal(ri.numpy(), golden["i2t_ranks"])
    np.testing.assert_array_equal(rt.numpy(), golden["t2i_ranks"])
    m = summarize_ranks(ri, rt)
    for d in ("i2t", "t2i"):
        got = [m[f"{d}_r1"], m[f"{d}_r5"], m[f"{d}_r10"], m[f"{d}_medr"], m[f"{d}_meanr"]]
        np.testing.assert_allclose(got, golden[f"{d}_r1_r5_r10_medr_meanr"], rtol=1e-12, atol=0)
    assert m["rsum"] == pytest.approx(float(golden["rsum"]), abs=1e-9)


def _train_batch(golden, varlen=False):
    ids = _t(golden["train_batch_caption_ids"])
    x = _t(golden["regions"])[ids // 5].clone()
    batch = {"tokens": _t(golden["tokens"])[ids], "lengths": _t(golden["lengths"])[ids], "image_ids": ids // 5}
    if varlen:
        n = _t(golden["var_img_lengths"])[ids // 5]
        x[torch.arange(36)[None, :] >= n[:, None]] = 0
        x = x[:, : int(n.max())]
        batch["image_lengths"] = n
    batch["tokens"] = batch["tokens"][:, : int(batch["lengths"].max())]
    batch["images"] = x
    return batch


@pytest.mark.parametrize("mode", ["eval", "bn", "bn_varlen"])
def test_losses_and_train_mode_batchnorm_equal_the_official(model, golden, mode):
    """train_bn_*: BatchNorm on batch statistics (zero-padded region rows included), no augmentation."""
    m = copy.deepcopy(model)
    m.train(mode != "eval")
    batch = _train_batch(golden, varlen=mode == "bn_varlen")
    img, cap = m.encode_images(batch), m.encode_captions(batch)
    prefix = {"eval": "train_eval", "bn": "train_bn", "bn_varlen": "train_bn_varlen"}[mode]
    if mode != "eval":
        _close(img["vector"], golden[f"{prefix}_img_emb"])
        if mode == "bn":
            _close(cap["vector"], golden[f"{prefix}_cap_emb"])
    m.sum_negatives_epochs = 0  # the warm-up epoch is over (the golden opt has max_violation True)
    for hardest, key in ((True, "loss_maxviol"), (False, "loss_sum")):
        m.hardest_negative = hardest
        loss = m.training_losses(batch, img, cap)["triplet"]
        assert loss.item() == pytest.approx(float(golden[f"{prefix}_{key}"]), rel=TOL, abs=TOL)


def test_every_key_is_mapped_strictly(tmp_path):
    ckpt = read_official(golden_path("vseinf_tiny.pth.tar"))
    ckpt.pop("_path")
    bad = copy.deepcopy(ckpt)
    del bad["model"][0]["mlp.bns.0.running_var"]
    torch.save(bad, tmp_path / "missing.pth.tar")
    with pytest.raises(DataError, match="image_mlp.bns.0.running_var"):
        load_official("vse_infinity", tmp_path / "missing.pth.tar")
    bad = copy.deepcopy(ckpt)
    bad["model"][1]["gpool.extra"] = torch.zeros(1)
    torch.save(bad, tmp_path / "extra.pth.tar")
    with pytest.raises(DataError, match="txt.gpool.extra"):
        load_official("vse_infinity", tmp_path / "extra.pth.tar")
    bad = copy.deepcopy(ckpt)
    bad["opt"].precomp_enc_type = "backbone"
    torch.save(bad, tmp_path / "grid.pth.tar")
    with pytest.raises(DataError, match="precomp_enc_type='backbone'"):
        load_official("vse_infinity", tmp_path / "grid.pth.tar")


def test_region_drop_and_caption_augmentation():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(1, 2 * 10 * 3 + 1, dtype=torch.float).view(2, 10, 3)
    y, n = drop_regions(x, 0.8, generator=g)
    for i in range(2):
        kept = y[i, : n[i]]
        assert (y[i, n[i]:] == 0).all()
        rows = [int(r[0]) for r in kept]
        assert rows == sorted(rows) and set(rows) <= set(int(r[0]) for r in x[i])  # kept ones, in order
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 2, 0], [1, 5, 2, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([7, 3])
    counts = torch.zeros(3)
    for s in range(300):
        t, ln = augment_captions(tokens, lengths, 50, 49, 0.2, generator=torch.Generator().manual_seed(s))
        assert (ln >= 1).all() and (ln <= lengths).all()
        assert all((t[i, ln[i]:] == 0).all() for i in range(2))
        counts += torch.tensor([(t == 49).sum(), 0, float((lengths - ln).sum())])
    # 20 % picked: half of those masked, 40 % deleted -> about 0.1 and 0.08 of the 10 tokens per draw
    assert 0.07 < counts[0] / 3000 < 0.13 and 0.05 < counts[2] / 3000 < 0.11


def test_training_step_runs_with_augmentation(model, golden):
    m = copy.deepcopy(model).train()
    loss = m.training_step(_train_batch(golden), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_reference_scoring_runs_the_slow_gpo(model, golden):
    from zoo.blocks import reference_scoring

    batch = {"images": _t(golden["regions"]), "tokens": _t(golden["tokens"]), "lengths": _t(golden["lengths"])}
    with torch.no_grad():
        fast = model.score(model.encode_images(batch), model.encode_captions(batch))
        with reference_scoring():
            ref = model.score(model.encode_images(batch), model.encode_captions(batch))
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    _close(ref, golden["sims"])
