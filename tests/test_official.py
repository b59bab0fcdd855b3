"""The official-checkpoint importer framework (zoo/methods/official.py) and the pickled-vocabulary reader."""
import argparse
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from datamodules.errors import DataError
from datamodules.text import Vocabulary
from zoo.methods.official import ANY, check_opt, map_state, read_official, strip_module_prefix


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def _official_sd():
    m = _Tiny()
    return {"module.fc.weight": torch.randn(2, 3), "module.fc.bias": torch.randn(2),
            **{f"module.norm.{k}": v.clone() + 1 for k, v in m.bn.state_dict().items()}}


def test_map_state_fills_every_key_and_strips_dataparallel():
    sd = _official_sd()
    m = _Tiny()
    map_state(sd, {"fc.": "enc.", "norm.": "bn."}, m)
    assert torch.equal(m.enc.weight, sd["module.fc.weight"])
    assert torch.equal(m.bn.running_var, sd["module.norm.running_var"])
    assert strip_module_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}  # all or nothing


@pytest.mark.parametrize("case", ["extra", "missing", "shape", "twice"])
def test_map_state_is_strict_and_names_the_key(case):
    sd, mapping = _official_sd(), {"fc.": "enc.", "norm.": "bn."}
    if case == "extra":
        sd["module.attn.weight"] = torch.zeros(1)
        want = "attn.weight"
    elif case == "missing":
        del sd["module.norm.running_mean"]
        want = "bn.running_mean"
    elif case == "shape":
        sd["module.fc.weight"] = torch.zeros(2, 4)
        want = "fc.weight (2, 4)"
    else:
        mapping = {"fc.": "enc.", "norm.": "bn.", "fc.bias": "enc.weight"}
        sd.pop("module.fc.bias")
        sd["module.fc.bias"] = torch.zeros(2, 3)
        want = "both map to enc.weight"
    with pytest.raises(DataError, match=want.replace("(", r"\(").replace(")", r"\)")):
        map_state(sd, mapping, _Tiny(), source="x.pth.tar")


def test_map_state_drops_only_what_the_mapping_names():
    sd = _official_sd()
    sd["module.unused.weight"] = torch.zeros(3)
    map_state(sd, {"fc.": "enc.", "norm.": "bn.", "unused.": None}, _Tiny())


def test_check_opt():
    opt = argparse.Namespace(embed_size=8, measure="cosine", workers=4, data_path="/x")
    assert check_opt(opt, {"embed_size": ANY, "measure": ("cosine",)})["embed_size"] == 8
    with pytest.raises(DataError, match="measure='order'"):
        check_opt(argparse.Namespace(embed_size=8, measure="order"), {"embed_size": ANY, "measure": ("cosine",)})
    with pytest.raises(DataError, match="new_flag=True"):
        check_opt(argparse.Namespace(embed_size=8, new_flag=True), {"embed_size": ANY})


def test_read_official_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_official(tmp_path / "none.pth.tar")
    torch.save({"state_dict": {}}, tmp_path / "l.ckpt")
    with pytest.raises(DataError, match="no 'model' entry"):
        read_official(tmp_path / "l.ckpt")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_read_official_refuses_arbitrary_objects(tmp_path):
    torch.save({"model": [], "opt": _Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(DataError, match="does not load"):
        read_official(tmp_path / "evil.pth.tar")


def _official_vocab_pickle(path, protocol):
    """A pickle as SCAN's vocab.py writes it: an instance of vocab.Vocabulary with word2idx/idx2word/idx."""
    mod = types.ModuleType("vocab")

    class Vocabulary:
        def __init__(self):
            self.word2idx, self.idx2word, self.idx = {}, {}, 0

        def add_word(self, w):
            self.word2idx[w], self.idx2word[self.idx] = self.idx, w
            self.idx += 1

    Vocabulary.__module__, Vocabulary.__qualname__ = "vocab", "Vocabulary"
    mod.Vocabulary = Vocabulary
    sys.modules["vocab"] = mod
    try:
        v = Vocabulary()
        for w in ["<pad>", "<start>", "<end>", "<unk>", "dog", "café"]:
            v.add_word(w)
        with open(path, "wb") as f:
            pickle.dump(v, f, protocol)
    finally:
        del sys.modules["vocab"]


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickled_vocabulary_loads_without_the_official_module(tmp_path, protocol):
    p = tmp_path / "f30k_precomp_vocab.pkl"
    _official_vocab_pickle(p, protocol)
    v = Vocabulary.load(p)
    assert v.idx2word == ["<pad>", "<start>", "<end>", "<unk>", "dog", "café"]


def test_pickled_vocabulary_refuses_other_globals(tmp_path):
    p = tmp_path / "evil_vocab.pkl"
    p.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataError, match="builtins.print is not allowed"):
        Vocabulary.load(p)
