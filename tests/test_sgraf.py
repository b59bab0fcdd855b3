"""SGRAF (SAF, SGR) equals the official code (Paranioar/SGRAF python3.6 @ a19d1a9) on the golden checkpoints."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from datamodules.errors import DataError
from golden import golden_npz, golden_path
from zoo.blocks import reference_scoring, triplet_ranking_loss
from zoo.blocks.sgraf import AttentionFiltration, GraphReasoning, SelfAttentionPool, sgraf_attended_regions
from zoo.engine.metrics import i2t_ranks, summarize_ranks, t2i_ranks
from zoo.experiments.ensemble import ensemble_metrics
from zoo.methods import SGRAF, load_official
from zoo.methods.official import read_official

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
KINDS = ("saf", "sgr")


@pytest.fixture(scope="module")
def golden():
    return golden_npz("sgraf_tiny_golden.npz")


@pytest.fixture(scope="module")
def models():
    return {k: load_official(f"sgraf_{k}", golden_path(f"sgraf_{k}_tiny.pth.tar")) for k in KINDS}


def _batch(g, ids=None):
    ids = torch.arange(30) if ids is None else ids
    return {"images": torch.from_numpy(g["regions"])[ids // 5], "tokens": torch.from_numpy(g["tokens"])[ids],
            "lengths": torch.from_numpy(g["lengths"])[ids], "image_ids": ids // 5}


def _encode(m, g):
    b = _batch(g)
    b["images"] = torch.from_numpy(g["regions"])
    return m.encode_images(b), m.encode_captions(b)


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a.detach().double() if torch.is_tensor(a) else a), b, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_import_configures_the_model_from_opt(models, kind):
    m = models[kind]
    assert isinstance(m, SGRAF) and not m.training and m.hparams.module == kind.upper()
    hp = m.hparams
    assert (hp.feature_dim, hp.embed_dim, hp.word_dim, hp.sim_dim, hp.vocab_size) == (64, 64, 32, 16, 50)
    assert m.hardest_negative and m.margin == 0.2 and hp.sgr_steps == 3
    assert m.lr_decay_epochs == (20 if kind == "saf" else 30)


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_alignments_and_sims_equal_the_official(models, golden, kind):
    m, p = models[kind], kind + "_"
    with torch.no_grad():
        img, cap = _encode(m, golden)
        sim_emb, node_mask = m.alignments(img, cap)
        sim_vec = m.reduce(sim_emb, node_mask)
        sims = m.score(img, cap)
    _close(img["regions"], golden[p + "img_embs"])
    _close(cap["words"], golden[p + "cap_embs"])
    _close(img["glo"], golden[p + "img_glo"])
    _close(cap["glo"], golden[p + "cap_glo"])
    _close(sim_emb.transpose(0, 1), golden[p + "sim_emb"])  # official layout: [caption, image, 1 + L, P]
    _close(sim_vec.transpose(0, 1), golden[p + "sim_vec"])
    _close(sims, golden[p + "sims"])
    # the blockwise split over captions gives the same numbers
    m2 = copy.deepcopy(m)
    m2.hparams.pair_budget = 1
    with torch.no_grad():
        _close(m2.score(img, cap), golden[p + "sims"])
        with reference_scoring():  # the official caption loop, cut to each caption's words
            _close(m.score(img, cap), golden[p + "sims"])


@pytest.mark.parametrize("kind", KINDS)
def test_recall_arrays_equal_the_official_exactly(models, golden, kind):
    p = kind + "_"
    with torch.no_grad():
        sims = models[kind].score(*_encode(models[kind], golden))
    ri, rt = i2t_ranks(sims), t2i_ranks(sims)
    np.testing.assert_array_equal(ri.numpy(), golden[p + "i2t_ranks"])
    np.testing.assert_array_equal(rt.numpy(), golden[p + "t2i_ranks"])
    res = summarize_ranks(ri, rt)
    for d in ("i2t", "t2i"):
        got = [res[f"{d}_r1"], res[f"{d}_r5"], res[f"{d}_r10"], res[f"{d}_medr"], res[f"{d}_meanr"]]
        np.testing.assert_allclose(got, golden[f"{p}{d}_r1_r5_r10_medr_meanr"], rtol=1e-12, atol=0)
    assert res["rsum"] == pytest.approx(float(golden[p + "rsum"]), abs=1e-9)


def _train_mode_without_dropout(m):
    m = copy.deepcopy(m).train()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()
    return m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train_eval", "train_bn"])
def test_training_batch_sims_and_losses_equal_the_official(models, golden, kind, mode):
    p = kind + "_"
    ids = torch.from_numpy(golden[p + "train_batch_caption_ids"])
    batch = _batch(golden, ids)
    m = copy.deepcopy(models[kind]) if mode == "train_eval" else _train_mode_without_dropout(models[kind])
    img, cap = m.encode_images(batch), m.encode_captions(batch)
    sims = m.score(img, cap)
    _close(sims, golden[f"{p}{mode}_sims"])
    for hardest, key in ((True, "maxviol"), (False, "sum")):
        m.hardest_negative = hardest
        loss = m.training_losses(batch, img, cap)["triplet"]
        assert loss.item() == pytest.approx(float(golden[f"{p}{mode}_loss_{key}"]), rel=TOL, abs=TOL)
        assert triplet_ranking_loss(sims, 0.2, hardest).item() == pytest.approx(loss.item(), abs=1e-6)


def test_saf_running_statistics_follow_the_official_caption_loop(models, golden):
    """Train mode: BN(1)'s running stats take one momentum step per caption, as official model.py:335-362 does."""
    m = _train_mode_without_dropout(models["saf"])
    ids = torch.from_numpy(golden["saf_train_batch_caption_ids"])
    batch = _batch(golden, ids)
    img, cap = m.encode_images(batch), m.encode_captions(batch)
    bn_ref = copy.deepcopy(m.saf.bn)
    m.score(img, cap)
    with torch.no_grad():  # the slow reference: the caption loop with a plain BatchNorm1d(1)
        sim_emb, mask = m.alignments(img, cap)
        x = m.saf.attn(sim_emb).squeeze(-1)
        for c in range(x.shape[1]):
            bn_ref(x[:, c, : int(mask[c].sum())].reshape(-1, 1, int(mask[c].sum())))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m.saf.bn, name), getattr(bn_ref, name), rtol=1e-6, atol=1e-7)


def test_sgraf_is_the_mean_of_the_two_matrices(models, golden):
    with torch.no_grad():
        sims = [models[k].score(*_encode(models[k], golden)) for k in KINDS]
    _close(0.5 * (sims[0] + sims[1]), golden["sgraf_sims"])
    res = ensemble_metrics(sims, 5)
    from zoo.engine.metrics import all_metrics
    assert res["all"]["rsum"] == pytest.approx(all_metrics(torch.from_numpy(golden["sgraf_sims"]), 5)["all"]["rsum"])


def test_blocks_ignore_padding_and_stay_finite():
    torch.manual_seed(0)
    regions, words = torch.randn(3, 5, 8), torch.randn(4, 6, 8)
    lengths = torch.tensor([6, 3, 1, 4])
    wm = torch.arange(6)[None] < lengths[:, None]
    att = sgraf_attended_regions(regions, words, wm)
    # padding cannot change a real word's attended vector
    att2 = sgraf_attended_regions(regions, words.masked_fill(~wm[..., None], 1e3), wm)
    torch.testing.assert_close(att, att2)
    assert (att[:, ~wm] == 0).all() and torch.isfinite(att).all()
    # slow reference: the official per-caption formula
    for c in range(4):
        n = int(lengths[c])
        a = torch.nn.functional.leaky_relu(regions @ words[c, :n].T, 0.1)  # [I, R, n]
        a = a / (a.norm(dim=2, keepdim=True) + 1e-8)
        a = torch.softmax(9 * a, dim=1)
        ref = torch.einsum("irn,ird->ind", a, regions)
        torch.testing.assert_close(att[:, c, :n], ref / (ref.norm(dim=-1, keepdim=True) + 1e-8), rtol=1e-5, atol=1e-6)
    pool = SelfAttentionPool(8).eval()
    out = pool(words, wm)
    torch.testing.assert_close(out, pool(words.masked_fill(~wm[..., None], 7.0), wm))
    torch.testing.assert_close(out[2], pool(words[2:3, :1]).squeeze(0))
    s = torch.randn(3, 4, 7, 8)
    node_mask = torch.cat([torch.ones(4, 1, dtype=torch.bool), wm], 1)
    for blk in (AttentionFiltration(8), GraphReasoning(8)):
        for train in (True, False):
            blk.train(train)
            y = blk(s, node_mask)
            s2 = s.masked_fill(~node_mask[None, :, :, None], 5.0)
            if train:
                blk.train(True)
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y, blk(s2, node_mask))


def test_visual_pooling_needs_the_official_region_count():
    with pytest.raises(ValueError, match="exactly 36 regions"):
        SelfAttentionPool(8, num_items=36)(torch.randn(2, 10, 8))


def test_importer_refuses_the_other_module_and_unknown_settings(tmp_path):
    ckpt = read_official(golden_path("sgraf_saf_tiny.pth.tar"))
    from zoo.methods.official import OFFICIAL
    with pytest.raises(DataError, match="SGRAF-SAF model"):
        OFFICIAL["sgraf_sgr"](ckpt, None)
    ckpt["opt"].bi_gru = False
    with pytest.raises(DataError, match="bi_gru"):
        OFFICIAL["sgraf_saf"](ckpt, None)
    ckpt = read_official(golden_path("sgraf_saf_tiny.pth.tar"))
    ckpt["model"][2]["sim_eval_w.extra"] = torch.zeros(1)
    with pytest.raises(DataError, match="sim_eval_w.extra"):
        OFFICIAL["sgraf_saf"](ckpt, None)


def write_golden_precomp(g: dict, root, split: str = "test") -> tuple:
    """The golden inputs as a precomputed folder: {split}_ims.npy [6, 36, 64], {split}_caps.txt (caption j of image
    j // 5), and a SCAN-format vocabulary whose ids are the golden token ids (3 = <unk>: written as an unknown word)."""
    from datamodules.text import Vocabulary
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", g["regions"])
    words = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(4, 50)]
    lines = []
    for tok, n in zip(g["tokens"], g["lengths"]):
        assert tok[0] == 1 and tok[n - 1] == 2
        lines.append(" ".join("oov" if i == 3 else words[i] for i in tok[1 : n - 1]))
    (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    vocab = root.parent / "golden_vocab.json"
    Vocabulary.from_words(words).save(vocab)
    return root, vocab


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_import_command_then_lightning_test_gives_the_official_recalls(tmp_path, golden, kind):
    """zoo-import-checkpoint on the golden checkpoint, then `lightning test` of the recipe on the golden inputs."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    from datamodules.text import Vocabulary, tokenize
    root, vocab = write_golden_precomp(golden, tmp_path / "golden_precomp")
    v = Vocabulary.load(vocab)  # the folder's captions encode to the golden ids exactly
    caps = (root / "test_caps.txt").read_text().splitlines()
    for j, c in enumerate(caps):
        n = int(golden["lengths"][j])
        assert v.encode(tokenize(c)) == golden["tokens"][j, :n].tolist()
    out = tmp_path / "imported.ckpt"
    bin_dir = Path(sys.executable).parent
    script = bin_dir / "zoo-import-checkpoint"  # the console script (pyproject); the same main() via -m otherwise
    command = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from zoo.methods.official import main; main(sys.argv[1:])"]
    imp = subprocess.run([*command, f"sgraf_{kind}",
                          str(golden_path(f"sgraf_{kind}_tiny.pth.tar")), "--out", str(out), "--vocab", str(vocab)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert imp.returncode == 0, imp.stderr[-3000:]
    recipe = Path(__file__).resolve().parents[1] / "recipes" / f"sgraf_{kind}_f30k.yaml"
    args = ["test", "--config", str(recipe), "--ckpt_path", str(out), "--data.init_args.root", str(root),
            "--data.init_args.vocab_path", str(vocab), "--data.init_args.feature_dim", "64",
            "--data.init_args.num_workers", "0", "--data.init_args.eval_batch_size", "8",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs")]
    test = subprocess.run([str(bin_dir / "lightning"), *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    got = {k: float(v) for r in rows for k, v in r.items() if v not in ("", None) and k.startswith("test/")}
    p = kind + "_"
    for d in ("i2t", "t2i"):
        want = golden[f"{p}{d}_r1_r5_r10_medr_meanr"]
        for k, w in zip(("r1", "r5", "r10", "medr", "meanr"), want):
            assert got[f"test/{d}_{k}"] == pytest.approx(float(w), abs=1e-4), (d, k)
    assert got["test/rsum"] == pytest.approx(float(golden[p + "rsum"]), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sgraf_sgr_synth"])  # SCAN is CASC-base: tests/test_cli.py
def test_synth_recipe_trains_and_tests(tmp_path, recipe):
    """`lightning fit` then `lightning test` from the SynthScenes recipe (shrunk: 40 images, d = 16, one epoch)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shrink = ["--data.init_args.root", "ss", "--data.init_args.n_train", "40", "--data.init_args.n_dev", "10",
              "--data.init_args.n_test", "10", "--data.init_args.feature_dim", "32", "--data.init_args.num_workers",
              "0", "--data.init_args.vocab_min_count", "1", "--data.init_args.batch_size", "16",
              "--model.init_args.feature_dim", "32", "--model.init_args.embed_dim", "16",
              "--model.init_args.word_dim", "8", "--trainer.max_epochs", "1"]
    if recipe.startswith("sgraf"):
        shrink += ["--model.init_args.sim_dim", "8"]
    lightning = Path(sys.executable).parent / "lightning"
    cfg = str(root / "recipes" / f"{recipe}.yaml")
    fit = subprocess.run([str(lightning), "fit", "--config", cfg, *shrink], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "runs" / recipe / "checkpoints" / "best.ckpt"
    test = subprocess.run([str(lightning), "test", "--config", cfg, "--ckpt_path", str(ckpt), *shrink],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "| all images |" in test.stdout


@pytest.mark.parametrize("module,num_regions", [("SAF", 4), ("SGR", None)])
def test_fit_checkpoint_roundtrip_and_finite_with_padding(tmp_path, module, num_regions, one_thread):
    """The shared loop: a tiny fit, the checkpoint rebuilds the model; padded captions and a zero image stay finite.
    num_regions None: VisualSA's BatchNorm is sized from the data's region count and the checkpoint keeps it."""
    import lightning as L

    from conftest import write_split
    from datamodules import PrecompDataModule
    root = tmp_path / "d"
    write_split(root, "train", n_images=10)
    write_split(root, "dev", n_images=6, seed=1)
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, num_workers=0, batch_size=8, eval_batch_size=3,
                           vocab_min_count=1, val_max_images=None)
    dm.prepare_data()
    torch.manual_seed(0)
    model = SGRAF(feature_dim=8, embed_dim=16, word_dim=8, sim_dim=8, num_regions=num_regions, module=module,
                  fold_size=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        gradient_clip_val=2.0)
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0 < model.last_metrics["all"]["rsum"] <= 600
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = SGRAF.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams.num_regions == 4 and loaded.v_global.local[1].num_features == 4
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k, a in want.items():
        assert torch.equal(a, got[k]), k
    loaded.train()
    batch = {"images": torch.zeros(3, 4, 8), "tokens": torch.tensor([[1, 4, 2, 0, 0], [1, 5, 6, 7, 2], [1, 2, 0, 0, 0]]),
             "lengths": torch.tensor([3, 5, 2]), "image_ids": torch.arange(3)}
    loss = loaded.training_losses(batch, loaded.encode_images(batch), loaded.encode_captions(batch))["triplet"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in loaded.parameters() if p.grad is not None)


def test_num_regions_from_the_data_needs_a_count():
    class NoCount:
        vocab_size, vocab_path, num_regions = 10, None, 0
    model = SGRAF(vocab_size=10, feature_dim=8, embed_dim=16, word_dim=8, sim_dim=8, num_regions=None, fold_size=None)
    with pytest.raises(RuntimeError, match="give a datamodule, or set num_regions"):
        model.encode_images({"images": torch.zeros(2, 4, 8)})
    with pytest.raises(ValueError, match="set model.num_regions to the features' region count"):
        model.configure_from_data(NoCount())
    with pytest.raises(ValueError, match="whole number >= 1"):
        SGRAF(num_regions=0)
