"""Trustworthy runs: each case here gave wrong numbers with exit code 0, or a traceback, before it was fixed."""
import json
import threading
import time

import lightning as L
import numpy as np
import pytest
import torch

from conftest import write_split
from datamodules import DataError, PrecompDataModule
from datamodules.layout import load_split
from datamodules.parsing import Parse
from datamodules.prepare import cache_lock, check_split, parse_path, parse_split, prepare, read_parse_meta
from datamodules.text import Vocabulary, tokenize
from zoo.methods import CASCBase


def _dm(root, **kw):
    for k, v in dict(num_regions=4, feature_dim=8, num_workers=0, vocab_min_count=1, batch_size=10,
                     eval_batch_size=3, val_max_images=None).items():
        kw.setdefault(k, v)
    return PrecompDataModule(str(root), **kw)


def _err(fn):
    with pytest.raises(DataError) as e:
        fn()
    return e.value


def _trainer(tmp_path, **kw):
    kw.setdefault("max_epochs", 1)
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), accelerator="cpu", **kw)


# ---- 1. the vocabulary is bound to its data and to the checkpoint -----------------------------------------

def _fit_tiny(tmp_path, root):
    from zoo.engine.callbacks import ZooCheckpoint

    L.seed_everything(0)
    dm = _dm(root)
    model = CASCBase(feature_dim=8, embed_dim=16, word_dim=8, fold_size=None)
    _trainer(tmp_path / "run", callbacks=[ZooCheckpoint()]).fit(model, dm)
    return dm, tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_checkpoint_refuses_a_reordered_vocabulary_of_the_same_size(tmp_path, tiny_data):
    dm, ckpt = _fit_tiny(tmp_path, tiny_data)
    words = dm.vocab.idx2word
    assert torch.load(ckpt, weights_only=False)["zoo_data"]["vocab"] == words  # words, not just the size
    shuffled = words[:4] + words[4:][::-1]  # same size, other order: chance-level recall before the fix
    Vocabulary.from_words(shuffled).save(tmp_path / "other.json")
    model = CASCBase(feature_dim=8, embed_dim=16, word_dim=8, fold_size=None)
    e = _err(lambda: _trainer(tmp_path).test(model, _dm(tiny_data, vocab_path=str(tmp_path / "other.json")),
                                             ckpt_path=str(ckpt)))
    assert "not the one the checkpoint was trained with" in e.problem and "same size" in e.problem
    assert "data.vocab_path" in e.fix
    # the checkpoint's own vocabulary, written back out, is accepted
    from zoo.tools.vocab import main as vocab_main

    vocab_main([str(ckpt), str(tmp_path / "own.json")])
    model = CASCBase(feature_dim=8, embed_dim=16, word_dim=8, fold_size=None)
    out = _trainer(tmp_path).test(model, _dm(tiny_data, vocab_path=str(tmp_path / "own.json")), ckpt_path=str(ckpt))
    assert out[0]["test/rsum"] > 0


def test_vocabulary_is_rebuilt_when_the_training_captions_change(tiny_data):
    dm = _dm(tiny_data)
    assert "zebra" not in dm.vocab.word2idx
    caps = (tiny_data / "train_caps.txt").read_text().splitlines()
    (tiny_data / "train_caps.txt").write_text("\n".join(c.replace("dog", "zebra") for c in caps) + "\n")
    dm2 = _dm(tiny_data)  # same cache folder, same file name: the old vocabulary must not be reused
    assert "zebra" in dm2.vocab.word2idx and dm2.vocab.meta["digest"] != dm.vocab.meta["digest"]


def test_shared_cache_dir_between_two_datasets(tmp_path):
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    write_split(a, "train", captions=[f"a dog sits {i % 3}" for i in range(30)])
    write_split(b, "train", captions=[f"one horse runs {i % 3}" for i in range(30)])
    assert "dog" in _dm(a, cache_dir=str(cache)).vocab.word2idx
    vb = _dm(b, cache_dir=str(cache)).vocab
    assert "horse" in vb.word2idx and "dog" not in vb.word2idx


def test_another_datasets_vocabulary_is_refused_by_its_unknown_rate(tmp_path, tiny_data):
    Vocabulary.build(["one horse runs on the beach"] * 4, min_count=1).save(tmp_path / "foreign.json")
    e = _err(lambda: _dm(tiny_data, vocab_path=str(tmp_path / "foreign.json")).setup("fit"))
    assert "are <unk>" in e.problem and "train_caps.txt" in e.problem and "max_unk_rate" in e.fix


def test_mistyped_vocab_path_is_an_error_not_a_new_vocabulary(tmp_path, tiny_data):
    typo = tmp_path / "vocab.jsno"
    e = _err(lambda: _dm(tiny_data, vocab_path=str(typo)).prepare_data())
    assert "not found" in e.problem and not typo.exists()


def test_vocabulary_json_with_idx2word_as_a_list(tmp_path):
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog"]
    (tmp_path / "v.json").write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)},
                                                 "idx2word": words, "idx": 5}))
    assert Vocabulary.load(tmp_path / "v.json").idx2word == words


class _CountingParser:
    """A stand-in parser: every word a NOUN attached to the first; raises after `fail_after` chunks."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def parse(self, sentences):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [Parse(["NOUN"] * len(s), [-1] + [0] * (len(s) - 1), ["dep"] * len(s)) for s in sentences]


def test_interrupted_prepare_resumed_after_the_captions_changed(tmp_path):
    out = tmp_path / "train_parse.fake.npz"
    caps = [f"a dog number {i}" for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        parse_split(caps, out, "fake", chunk_size=3, progress=False, parser=_CountingParser(fail_after=2))
    assert len(list(out.with_suffix(".parts").glob("0*.npz"))) == 2  # two finished chunks kept
    edited = [c.replace("dog", "big red cat") for c in caps]
    parse_split(edited, out, "fake", chunk_size=3, progress=False, parser=_CountingParser())
    with np.load(out) as z:  # every caption parsed from the edited text: no stale chunk survived
        assert np.diff(z["offsets"]).tolist() == [len(tokenize(c)) for c in edited]
    # resuming the same captions reuses the finished chunks
    out2 = tmp_path / "dev_parse.fake.npz"
    with pytest.raises(KeyboardInterrupt):
        parse_split(caps, out2, "fake", chunk_size=3, progress=False, parser=_CountingParser(fail_after=2))
    p = _CountingParser()
    parse_split(caps, out2, "fake", chunk_size=3, progress=False, parser=p)
    assert p.calls == 2  # chunks 3 and 4 only


def test_stale_parse_is_rebuilt_by_prepare(tmp_path, monkeypatch):
    import datamodules.prepare as prep

    monkeypatch.setattr(prep, "get_parser", lambda backend: _CountingParser())
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    prepare(root, ["train"], parser="fake", progress=False)
    old = read_parse_meta(parse_path(root, "train", "fake"))["digest"]
    (root / "train_caps.txt").write_text("\n".join(["two cats sleep ."] * 10) + "\n")
    prepare(root, ["train"], parser="fake", progress=False)
    assert read_parse_meta(parse_path(root, "train", "fake"))["digest"] != old


# ---- 2. one caption per image is not a repeated-rows release ------------------------------------------------

def test_one_caption_per_image_is_not_read_as_repeated_rows(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=10, caps_per_image=1, captions=[f"a dog {i}" for i in range(10)])
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8))
    assert "not copies of one image" in e.problem and "caps_per_image: 1" in e.fix
    data = load_split(root, "train", num_regions=4, feature_dim=8, caps_per_image=1)
    assert data.n_images == 10 and data.image_stride == 1


def test_check_features_compares_every_group_of_repeated_rows(tmp_path):
    root = tmp_path / "d"
    feats = write_split(root, "train", n_images=40, repeat_rows=True)
    feats[5 * 17 + 2] += 1.0  # one group the sampled check does not look at
    np.save(root / "train_ims.npy", feats)
    load_split(root, "train", num_regions=4, feature_dim=8)  # 8 sampled groups: 0, 5, 11, ... pass
    e = _err(lambda: check_split(root, "train", progress=False))
    assert "rows 85-89" in e.problem


# ---- 3. last.ckpt is the last epoch; a killed run resumes where it stopped -------------------------------------
# (the end-to-end kill-and-resume test through the CLI is in test_cli.py)

def test_last_checkpoint_is_refreshed_every_epoch_without_improvement(tmp_path, tiny_data):
    from zoo.engine.callbacks import ZooCheckpoint

    model = CASCBase(feature_dim=8, embed_dim=16, word_dim=8, fold_size=None, lr=0.0)  # val/rsum never improves
    _trainer(tmp_path, max_epochs=3, callbacks=[ZooCheckpoint()]).fit(model, _dm(tiny_data))
    ck = tmp_path / "checkpoints"
    assert torch.load(ck / "best.ckpt", weights_only=False)["epoch"] == 0
    assert torch.load(ck / "last.ckpt", weights_only=False)["epoch"] == 2  # was 0 with ModelCheckpoint(save_last)


def test_training_order_depends_only_on_seed_and_epoch(tiny_data):
    dm = _dm(tiny_data, shuffle_seed=3)
    dm.setup("fit")

    def order(epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 100)  # the global RNG (not restored on resume) must not matter
        return torch.cat([b["caption_ids"] for b in loader]).tolist()

    assert order(1) == order(1) and order(1) != order(2) and sorted(order(1)) == list(range(60))


# ---- 5. the tokenizer on real-world text ---------------------------------------------------------------------

def test_tokenizer_on_real_world_text():
    assert tokenize("\ufeffA dog") == ["a", "dog"]  # BOM
    assert tokenize("Cafe\u0301 au lait") == tokenize("Café au lait") == ["café", "au", "lait"]  # NFD -> NFC
    assert tokenize("naïve Zürich señor") == ["naïve", "zürich", "señor"]
    assert tokenize("Москва и 東京") == ["москва", "и", "東京"]
    assert tokenize("A man’s dog isn’t “happy”.") == tokenize("A man's dog isn't \"happy\".") == \
        ["a", "man", "'s", "dog", "is", "n't", "``", "happy", "''", "."]


CAPTIONS = [
    "A man's dog, jumping-over the X-ray!", "Two children aren't playing (really) near 3.5 m of water.",
    "A woman says: \"cannot stop\"; then leaves...", "The dogs' toys are on the ground -- everywhere.",
    "A group of people at a cafe, drinking coffee & tea.", "It's a 'quoted' word, isn't it?",
    "Kids are gonna play ball @ the park #fun", "A sign reads 50% off!", "He's got 2,000 bottles.",
    "A person in a t-shirt, jeans and a baseball cap stands by a bus.",
]


def test_tokenizer_matches_nltk_treebank_tokenization():
    """SCAN's vocabularies come from nltk.word_tokenize(caption.lower()): same tokens on ordinary captions."""
    nltk_tokenize = pytest.importorskip("nltk.tokenize").NLTKWordTokenizer().tokenize  # nltk is in the test extra
    for c in CAPTIONS:
        assert tokenize(c) == nltk_tokenize(c.lower()), c


def test_prepare_reports_the_unknown_rate(tmp_path, capsys):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2, captions=["a dog"] * 10)
    write_split(root, "test", n_images=2, captions=["a dog", "a cat", "a cat", "a dog", "a dog"] * 2)
    prepare(root, ["train", "test"], parser=None, min_count=1, progress=False)
    err = capsys.readouterr().err
    assert "train: 0.00% of words are <unk>" in err and "test: 20.00% of words are <unk>" in err


# ---- errors that were tracebacks -------------------------------------------------------------------------------

def test_nan_rows_stop_before_training_and_the_scan_is_cached(tiny_data, monkeypatch):
    import datamodules.layout as layout

    feats = np.load(tiny_data / "train_ims.npy")
    feats[7, 1, 2] = np.inf
    feats[9, 0, 0] = np.nan
    np.save(tiny_data / "train_ims.npy", feats)
    e = _err(lambda: _dm(tiny_data).setup("fit"))  # at setup, not inside a DataLoader worker mid-epoch
    assert "2 row(s) contain NaN or Inf" in e.problem and "[7, 9]" in e.problem
    calls = []
    monkeypatch.setattr(layout, "scan_features", lambda *a, **k: calls.append(a) or pytest.fail("rescanned"))
    e = _err(lambda: _dm(tiny_data).setup("fit"))  # second time: from the cached scan
    assert "[7, 9]" in e.problem and not calls


def test_check_features_flags_zero_and_huge_rows(tmp_path):
    root = tmp_path / "d"
    feats = write_split(root, "train", n_images=4)
    feats[1] = 0
    feats[3, 0, 0] = 1e6
    np.save(root / "train_ims.npy", feats)
    warnings = check_split(root, "train", progress=False)
    assert any("all zero" in w and "[1]" in w for w in warnings)
    assert any("above" in w and "[3]" in w for w in warnings)


def test_model_and_data_mismatches_are_clear_errors(tmp_path, tiny_data):
    model = CASCBase(feature_dim=2048, embed_dim=16, word_dim=8, fold_size=None)
    e = _err(lambda: _trainer(tmp_path).fit(model, _dm(tiny_data)))
    assert "8-d region features" in e.problem and "model.feature_dim" in e.fix
    model = CASCBase(vocab_size=7, feature_dim=8, embed_dim=16, word_dim=8, fold_size=None)
    e = _err(lambda: _trainer(tmp_path).fit(model, _dm(tiny_data)))
    assert "7 words" in e.problem


def test_missing_and_truncated_checkpoints(tmp_path, tiny_data):
    from zoo.engine.checkpoints import check_checkpoint

    e = _err(lambda: check_checkpoint(str(tmp_path / "nope.ckpt")))
    assert "not found" in e.problem
    _, ckpt = _fit_tiny(tmp_path, tiny_data)
    check_checkpoint(str(ckpt))
    data = ckpt.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    e = _err(lambda: check_checkpoint(str(tmp_path / "cut.ckpt")))
    assert "truncated" in e.problem


def test_npz_named_npy(tmp_path):
    root = tmp_path / "d"
    feats = write_split(root, "train", n_images=2)
    with open(root / "train_ims.npy", "wb") as f:
        np.savez(f, features=feats)
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8))
    assert ".npz archive" in e.problem and "features" in e.problem and "np.save" in e.fix


def test_data_root_that_is_a_file(tmp_path):
    (tmp_path / "f30k_precomp").write_text("")
    e = _err(lambda: _dm(tmp_path / "f30k_precomp").setup("fit"))
    assert "is a file, not a data folder" in e.problem


def test_prepare_into_an_unwritable_folder_asks_for_cache_dir(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    (tmp_path / "file").write_text("")
    e = _err(lambda: prepare(root, ["train"], parser=None, cache_dir=tmp_path / "file" / "sub", progress=False))
    assert "--cache-dir" in e.fix


def test_captions_per_image_has_one_source_the_data(tmp_path):
    root = tmp_path / "d"
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        write_split(root, split, n_images=n, caps_per_image=2, seed=len(split),
                    captions=[f"a dog {i % 4}" for i in range(2 * n)])
    model = CASCBase(feature_dim=8, embed_dim=16, word_dim=8, fold_size=None)
    assert "caps_per_image" not in model.hparams
    out = _trainer(tmp_path).validate(model, _dm(root, caps_per_image=2))  # 2 captions per image end to end
    assert model.caps_per_image == 2 and out[0]["val/rsum"] > 0


def test_concurrent_prepare_runs_wait_for_each_other(tmp_path, capsys):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    events = []
    with cache_lock(root):
        t = threading.Thread(target=lambda: (prepare(root, ["train"], parser=None, progress=False),
                                             events.append("second done")))
        t.start()
        time.sleep(0.5)
        events.append("first done")
    t.join(timeout=30)
    assert events == ["first done", "second done"]
    assert "waiting for another zoo-prepare" in capsys.readouterr().err


@pytest.mark.parametrize("box, problem, fix", [
    ([10.0, 20.0, 300.0, 400.0], "outside [0, 1]", "divide pixel boxes"),
    ([0.5, 0.5, 0.2, 0.3], "x2 < x1", "(x, y, w, h)"),
    ([0.1, float("nan"), 0.2, 0.3], "NaN", "re-extract"),
])
def test_box_errors_show_the_box_and_the_matching_fix(tmp_path, box, problem, fix):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    b = np.load(root / "train_boxes.npy")
    b[1, 2] = box
    np.save(root / "train_boxes.npy", b)
    e = _err(lambda: load_split(root, "train", num_regions=4, feature_dim=8, with_boxes=True))
    assert problem in e.problem and "row 1, region 2" in e.problem and fix in e.fix
    assert str(round(box[0], 4)) in e.problem
