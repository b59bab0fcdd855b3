"""SCAN (t-i / i-t, AVG / LSE) as CASC-base presets equals SCAN's official formulas (kuanghuei/SCAN @ 8063557),
and its official checkpoint format imports (scan_t2i / scan_i2t)."""
import argparse

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from datamodules.errors import DataError
from zoo.blocks import reference_scoring
from zoo.methods import CASCBase, load_official, scan_model
from zoo.methods.scan import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")


def _l2(x, dim):  # SCAN model.py:32-37 (norm + eps)
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def _official_scores(images, captions, lengths, direction, agg, lam, lse):
    """SCAN's xattn_score_t2i / xattn_score_i2t (model.py:178-333), written out per caption as the official loop."""
    sims = []
    for i in range(captions.shape[0]):
        cap = captions[i, : int(lengths[i])][None].repeat(images.shape[0], 1, 1)
        query, context = (cap, images) if direction == "t2i" else (images, cap)
        attn = torch.bmm(context, query.transpose(1, 2))  # [n, source, query]
        attn = _l2(nn.functional.leaky_relu(attn, 0.1), 2)  # clipped_l2norm over the query items
        attn = torch.softmax(attn.transpose(1, 2) * lam, dim=2)  # over the source items
        wctx = torch.bmm(attn, context)
        row = (query * wctx).sum(2) / (query.norm(dim=2) * wctx.norm(dim=2)).clamp(min=1e-8)
        row = torch.log(torch.exp(row * lse).sum(1)) / lse if agg == "lse" else row.mean(1)
        sims.append(row)
    return torch.stack(sims, 1)


@pytest.mark.parametrize("direction,agg,data", sorted(PRESETS))
def test_presets_equal_scans_formulas(direction, agg, data):
    p = PRESETS[(direction, agg, data)]
    m = scan_model(direction, "lse" if agg == "lse" else "mean", p["lambda_softmax"], p.get("lambda_lse", 6.0),
                   vocab_size=20, feature_dim=12, embed_dim=8, word_dim=6).eval()
    torch.manual_seed(1)
    x, tokens = torch.rand(3, 5, 12), torch.randint(1, 20, (4, 7))
    lengths = torch.tensor([7, 2, 5, 1])
    with torch.no_grad():
        img, cap = m.encode_images({"images": x}), m.encode_captions({"tokens": tokens, "lengths": lengths})
        want = _official_scores(img["regions"], cap["words"], lengths, direction, agg, p["lambda_softmax"],
                                p.get("lambda_lse", 6.0))
        torch.testing.assert_close(m.score(img, cap), want, rtol=1e-5, atol=1e-5)
        with reference_scoring():
            torch.testing.assert_close(m.score(img, cap), want, rtol=1e-5, atol=1e-5)


def _official_checkpoint(direction="t2i", **opt):
    """A checkpoint in SCAN's format (train.py:163-175): {'model': [img_enc, txt_enc], 'opt', ...}."""
    torch.manual_seed(3)
    fc, embed = nn.Linear(12, 8), nn.Embedding(20, 6)
    rnn = nn.GRU(6, 8, 1, batch_first=True, bidirectional=True)
    args = dict(data_name="f30k_precomp", margin=0.2, num_epochs=30, batch_size=128, word_dim=6, embed_size=8,
                grad_clip=2.0, num_layers=1, learning_rate=2e-4, lr_update=15, workers=10, log_step=10,
                val_step=500, logger_name="runs/log", model_name="runs/model", resume="", max_violation=True,
                img_dim=12, no_imgnorm=False, no_txtnorm=False, raw_feature_norm="clipped_l2norm",
                agg_func="LogSumExp", cross_attn=direction, precomp_enc_type="basic", bi_gru=True, lambda_lse=6.0,
                lambda_softmax=9.0, data_path="data", vocab_path="vocab", vocab_size=20)
    args.update(opt)
    model = [{f"fc.{k}": v for k, v in fc.state_dict().items()},
             {"embed.weight": embed.weight.data, **{f"rnn.{k}": v for k, v in rnn.state_dict().items()}}]
    return {"epoch": 3, "model": model, "best_rsum": 100.0, "opt": argparse.Namespace(**args), "Eiters": 0}, (fc, embed, rnn)


def _official_encoders(parts, x, tokens, lengths):
    fc, embed, rnn = parts
    img = _l2(fc(x), -1)
    order = torch.argsort(lengths, descending=True)
    out, _ = rnn(pack_padded_sequence(embed(tokens[order]), lengths[order], batch_first=True))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
    out = _l2((out[..., :8] + out[..., 8:]) / 2, -1)
    return img, out[torch.argsort(order)]


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_official_checkpoint_imports(tmp_path, direction):
    ckpt, parts = _official_checkpoint(direction, lambda_softmax=4.0 if direction == "i2t" else 9.0)
    path = tmp_path / "model_best.pth.tar"
    torch.save(ckpt, path)
    m = load_official(f"scan_{direction}", path)
    assert isinstance(m, CASCBase) and m.hparams.direction == direction and m.hparams.aggregation == "lse"
    torch.manual_seed(4)
    x, tokens, lengths = torch.rand(3, 5, 12), torch.randint(1, 20, (4, 7)), torch.tensor([7, 2, 5, 1])
    with torch.no_grad():
        img, cap = m.encode_images({"images": x}), m.encode_captions({"tokens": tokens, "lengths": lengths})
        ref_img, ref_cap = _official_encoders(parts, x, tokens, lengths)
        torch.testing.assert_close(img["regions"], ref_img, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap["words"], ref_cap, rtol=1e-5, atol=1e-6)
        want = _official_scores(ref_img, ref_cap, lengths, direction, "lse", 4.0 if direction == "i2t" else 9.0, 6.0)
        torch.testing.assert_close(m.score(img, cap), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,match", [({"cross_attn": "i2t"}, "scan_i2t"), ({"agg_func": "Max"}, "agg_func"),
                                          ({"precomp_enc_type": "weight_norm"}, "precomp_enc_type"),
                                          ({"no_imgnorm": True}, "no_imgnorm"), ({"new_flag": 1}, "new_flag")])
def test_unsupported_settings_are_errors(tmp_path, change, match):
    ckpt, _ = _official_checkpoint("t2i", **change)
    path = tmp_path / "m.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(DataError, match=match):
        load_official("scan_t2i", path)


def test_a_missing_key_is_an_error(tmp_path):
    ckpt, _ = _official_checkpoint("t2i")
    del ckpt["model"][1]["rnn.bias_hh_l0_reverse"]
    path = tmp_path / "m.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(DataError, match="bias_hh_l0_reverse"):
        load_official("scan_t2i", path)


RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("scan_*.yaml")) +
                         sorted(p.stem for p in RECIPES.glob("sgraf_*.yaml")))
def test_recipes_build_their_model_with_the_official_settings(name):
    import importlib

    import yaml
    cfg = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    mod, cls = cfg["model"]["class_path"].rsplit(".", 1)
    m = getattr(importlib.import_module(mod), cls)(**cfg["model"]["init_args"])
    hp = m.hparams
    parts = name.split("_")
    if parts[0] == "scan":
        direction, agg, data = parts[1:]
        assert hp.direction == direction and hp.aggregation == ("lse" if agg == "lse" else "mean")
        p = PRESETS[(direction, agg, "f30k" if data == "synth" else data)]
        assert hp[f"lambda_{direction}"] == p["lambda_softmax"]
        if agg == "lse":
            assert hp.lse_temperature == p["lambda_lse"]
    else:
        assert hp.module == parts[1].upper() and hp.sgr_steps == 3 and hp.dropout == 0.4
    if parts[-1] != "synth":
        from zoo.methods.scan import SCHEDULES
        epochs = {"sgraf_saf_f30k": (30, 20), "sgraf_sgr_f30k": (40, 30)}.get(name, (20, 10) if "coco" in name else None)
        if parts[0] == "scan":
            s = SCHEDULES[parts[-1]]
            epochs = (s["num_epochs"], s["lr_update"])
            assert m.lr == s["learning_rate"]
        assert (cfg["trainer"]["max_epochs"], m.lr_decay_epochs) == epochs
        assert cfg["trainer"]["gradient_clip_val"] == 2.0 and m.margin == 0.2 and m.hardest_negative
