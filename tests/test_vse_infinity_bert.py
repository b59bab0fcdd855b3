"""VSE-infinity BERT (official master branch) import: a tiny checkpoint in the official format (random BERT, no
download), loaded strictly, equals the official forward written out here with transformers and the slow GPO."""
import argparse
import copy

import pytest
import torch

from datamodules.errors import DataError
from zoo.blocks import GPO, BatchNormMLP, slow_gpo
from zoo.methods import VSEInfinityBert, load_official

transformers = pytest.importorskip("transformers")

OPT = dict(data_path="/tmp/data/f30k", data_name="f30k", vocab_path="./vocab/", margin=0.2, num_epochs=25,
           batch_size=128, word_dim=300, embed_size=64, grad_clip=2.0, learning_rate=5e-4, lr_update=15, optim="adam",
           workers=10, log_step=200, val_step=500, logger_name="runs/x/log", model_name="runs/x", resume="",
           max_violation=True, img_dim=48, no_imgnorm=False, no_txtnorm=False, precomp_enc_type="basic",
           backbone_path="", backbone_source="detector", vse_mean_warmup_epochs=1, reset_start_epoch=False,
           backbone_warmup_epochs=5, embedding_warmup_epochs=2, backbone_lr_factor=0.01, input_scale_factor=1)


def _official_checkpoint(path):
    """What master's train.py saves: [img_enc, txt_enc] state dicts, DataParallel-wrapped (`module.`)."""
    torch.manual_seed(5)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=40)
    bert = transformers.BertModel(cfg).eval()
    img = {"fc": torch.nn.Linear(48, 64), "mlp": BatchNormMLP(48, 32, 64, 2), "gpool": GPO(32, 32)}
    for bn in img["mlp"].bns:
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    img_sd = {}
    for name, mod in img.items():
        img_sd |= {f"module.{name}.{k}": v for k, v in mod.state_dict().items()}
    img_sd |= {f"module.mlp.bns.1.{k}": v for k, v in torch.nn.BatchNorm1d(64).state_dict().items()}  # never used
    linear, gpool = torch.nn.Linear(128, 64), GPO(32, 32)
    txt_sd = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    txt_sd |= {f"module.linear.{k}": v for k, v in linear.state_dict().items()}
    txt_sd |= {f"module.gpool.{k}": v for k, v in gpool.state_dict().items()}
    torch.save({"epoch": 3, "model": [img_sd, txt_sd], "best_rsum": 0.0, "opt": argparse.Namespace(**OPT),
                "Eiters": 0}, path)
    return img, bert, linear, gpool


def _l2(x):
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)  # official l2norm


def test_bert_checkpoint_equals_the_official_forward(tmp_path, one_thread):
    img, bert, linear, gpool = _official_checkpoint(tmp_path / "m.pth")
    m = load_official("vse_infinity_bert", tmp_path / "m.pth")
    assert isinstance(m, VSEInfinityBert)
    torch.manual_seed(1)
    x = torch.rand(3, 36, 48)
    lengths = torch.tensor([9, 5, 7])
    ids = torch.randint(1000 % 99, 99, (3, 9))
    ids[:, 0] = 2  # [CLS]-like
    ids[torch.arange(9)[None] >= lengths[:, None]] = 0
    with torch.no_grad():
        s = m.score(m.encode_images({"images": x}), m.encode_captions({"tokens": ids, "lengths": lengths}))
        for mod in img.values():
            mod.eval()
        feats = img["fc"](x) + img["mlp"](x)
        v = _l2(slow_gpo(img["gpool"], feats, torch.full((3,), 36))[0])
        hidden = bert(ids, (ids != 0).float())[0]
        t = _l2(slow_gpo(gpool, linear(hidden), lengths)[0])
    torch.testing.assert_close(s, v @ t.t(), atol=1e-5, rtol=0)


def test_bert_import_is_strict(tmp_path):
    _official_checkpoint(tmp_path / "m.pth")
    ckpt = torch.load(tmp_path / "m.pth", weights_only=False)
    bad = copy.deepcopy(ckpt)
    del bad["model"][1]["module.bert.encoder.layer.1.output.dense.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(DataError, match="bert.encoder.layer.1.output.dense.bias"):
        load_official("vse_infinity_bert", tmp_path / "bad.pth")
    nobert = copy.deepcopy(ckpt)
    nobert["model"][1] = {k: v for k, v in nobert["model"][1].items() if "bert." not in k}
    torch.save(nobert, tmp_path / "nobert.pth")
    with pytest.raises(DataError, match="not BERT"):
        load_official("vse_infinity_bert", tmp_path / "nobert.pth")


def test_imported_bert_checkpoint_reloads_without_a_download(tmp_path):
    from zoo.methods.official import lightning_checkpoint

    _official_checkpoint(tmp_path / "m.pth")
    m = load_official("vse_infinity_bert", tmp_path / "m.pth")
    assert m.hparams.region_keep == 0.8 and m.hparams.caption_augment == 0.0
    lightning_checkpoint(m, tmp_path / "z.ckpt")
    hp = torch.load(tmp_path / "z.ckpt", weights_only=True)["hyper_parameters"]  # what LightningCLI reads
    assert hp["_class_path"] == "zoo.methods.vse_infinity.VSEInfinityBert" and hp["bert_config"]["hidden_size"] == 128
    back = VSEInfinityBert.load_from_checkpoint(tmp_path / "z.ckpt")
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
