"""VSE++ equals the official code (fartashf/vsepp python3 @ dae4e1c) on the golden checkpoint and inputs."""
import copy

import numpy as np
import pytest
import torch

from datamodules.errors import DataError
from golden import golden_npz, golden_path
from zoo.blocks import triplet_ranking_loss
from zoo.engine.metrics import i2t_ranks, summarize_ranks, t2i_ranks
from zoo.methods import VSEPP, load_official
from zoo.methods.official import read_official

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return golden_npz("vsepp_tiny_golden.npz")


@pytest.fixture(scope="module")
def model():
    return load_official("vsepp", golden_path("vsepp_tiny.pth.tar"))


def _encode(m, g, images=None):
    x = torch.from_numpy(g["global_feats"])[:, None] if images is None else images  # [6, 1, 64]: one region
    img = m.encode_images({"images": x})
    cap = m.encode_captions({"tokens": torch.from_numpy(g["tokens"]), "lengths": torch.from_numpy(g["lengths"])})
    return img, cap


def test_import_configures_the_model_from_opt(model):
    assert isinstance(model, VSEPP) and not model.training
    hp = model.hparams
    assert (hp.feature_dim, hp.embed_dim, hp.word_dim, hp.vocab_size) == (64, 64, 32, 50)
    assert model.hardest_negative and model.margin == 0.2  # --max_violation, margin 0.2
    assert model.official["best_rsum"] == pytest.approx(383.3333333333333)


def test_embeddings_and_sims_equal_the_official(model, golden):
    with torch.no_grad():
        img, cap = _encode(model, golden)
        sims = model.score(img, cap)
    np.testing.assert_allclose(img["vector"].numpy(), golden["img_embs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(cap["vector"].numpy(), golden["cap_embs"], atol=TOL, rtol=0)
    np.testing.assert_allclose(sims.double().numpy(), golden["sims"], atol=TOL, rtol=0)


def test_recall_arrays_equal_the_official_exactly(model, golden):
    with torch.no_grad():
        sims = model.score(*_encode(model, golden))
    ri, rt = i2t_ranks(sims), t2i_ranks(sims)
    np.testing.assert_array_equal(ri.numpy(), golden["i2t_ranks"])
    np.testing.assert_array_equal(rt.numpy(), golden["t2i_ranks"])
    m = summarize_ranks(ri, rt)
    for d in ("i2t", "t2i"):
        got = [m[f"{d}_r1"], m[f"{d}_r5"], m[f"{d}_r10"], m[f"{d}_medr"], m[f"{d}_meanr"]]
        np.testing.assert_allclose(got, golden[f"{d}_r1_r5_r10_medr_meanr"], rtol=1e-12, atol=0)
    assert m["rsum"] == pytest.approx(float(golden["rsum"]), abs=1e-9)


def test_losses_equal_the_official(model, golden):
    ids = torch.from_numpy(golden["train_batch_caption_ids"])
    batch = {"images": torch.from_numpy(golden["global_feats"])[ids // 5, None],
             "tokens": torch.from_numpy(golden["tokens"])[ids], "lengths": torch.from_numpy(golden["lengths"])[ids],
             "image_ids": ids // 5}
    m = copy.deepcopy(model).train()  # no BatchNorm, no dropout: train mode gives the same values
    img, cap = m.encode_images(batch), m.encode_captions(batch)
    for hardest, key in ((True, "train_loss_maxviol"), (False, "train_loss_sum")):
        m.hardest_negative = hardest
        loss = m.training_losses(batch, img, cap)["triplet"]
        assert loss.item() == pytest.approx(float(golden[key]), rel=TOL, abs=TOL)
        # the plain official formula (no shared-image mask) gives the same on this batch of distinct images
        assert triplet_ranking_loss(m.score(img, cap), 0.2, hardest).item() == pytest.approx(loss.item(), abs=1e-6)


def test_a_missing_or_unknown_key_or_setting_is_an_error(tmp_path):
    ckpt = read_official(golden_path("vsepp_tiny.pth.tar"))
    bad = copy.deepcopy(ckpt)
    del bad["model"][1]["rnn.bias_hh_l0"]
    torch.save(bad, tmp_path / "missing.pth.tar")
    with pytest.raises(DataError, match="rnn.bias_hh_l0"):
        load_official("vsepp", tmp_path / "missing.pth.tar")
    bad = copy.deepcopy(ckpt)
    bad["model"][0]["module.extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "extra.pth.tar")
    with pytest.raises(DataError, match="extra.weight"):
        load_official("vsepp", tmp_path / "extra.pth.tar")
    bad = copy.deepcopy(ckpt)
    bad["opt"].measure = "order"
    torch.save(bad, tmp_path / "order.pth.tar")
    with pytest.raises(DataError, match="measure='order'"):
        load_official("vsepp", tmp_path / "order.pth.tar")


def test_dataparallel_prefix_is_stripped(tmp_path):
    ckpt = read_official(golden_path("vsepp_tiny.pth.tar"))
    ckpt["model"] = [{f"module.{k}": v for k, v in sd.items()} for sd in ckpt["model"]]
    ckpt.pop("_path")
    torch.save(ckpt, tmp_path / "dp.pth.tar")
    a = load_official("vsepp", tmp_path / "dp.pth.tar")
    b = load_official("vsepp", golden_path("vsepp_tiny.pth.tar"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_region_features_are_averaged_first(model, golden):
    x = torch.rand(3, 4, 64)
    with torch.no_grad():
        a = model.encode_images({"images": x})["vector"]
        b = model.encode_images({"images": x.mean(1, keepdim=True)})["vector"]
    torch.testing.assert_close(a, b)
