"""Pickled official vocabularies (SCAN's and VSE++'s `*_vocab.pkl`) read without importing any official module.

The official `vocab.py` pickles an instance of its `Vocabulary(object)` class, whose only fields are `word2idx`
(word -> id), `idx2word` (id -> word) and `idx` (the size) (SCAN `vocab.py`, class Vocabulary; the files were written
by Python 2 with pickle protocol 2). The restricted unpickler below resolves exactly that class (under the module
names it was pickled from) to an inert stand-in that only stores its fields, plus the two helpers Python 2 pickles
may reference for plain objects; any other global in the file is refused, so loading executes nothing.
"""
from __future__ import annotations

import copyreg
import pickle
from pathlib import Path

from .errors import DataError

#: (module, class) names the official Vocabulary was pickled under (`python vocab.py` pickles it as __main__)
VOCAB_CLASSES = {("vocab", "Vocabulary"), ("__main__", "Vocabulary"), ("build_vocab", "Vocabulary"),
                 ("data", "Vocabulary"), ("lib.vocab", "Vocabulary")}


class _PickledVocabulary:
    """Stand-in for the official class: keeps the pickled fields, runs no official code."""

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in VOCAB_CLASSES:
            return _PickledVocabulary
        if (module, name) in {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")}:
            return copyreg._reconstructor
        if (module, name) in {("__builtin__", "object"), ("builtins", "object")}:
            return object
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a vocabulary pickle")


def _text(x) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x.decode("latin-1")
    return str(x)


def load_pickled_words(path: str | Path) -> list[str]:
    """The words of a pickled official Vocabulary, in id order (ids 0..n-1 must all be present)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(path, "vocabulary file not found", "check data.vocab_path / --vocab") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(path, f"not a pickled official Vocabulary ({type(e).__name__}: {e})",
                        "give the *_vocab.pkl of the official release, or a SCAN-format vocabulary JSON") from None
    state = getattr(obj, "state", None)
    if isinstance(obj, _PickledVocabulary) and isinstance(state, dict):
        fields = {_text(k): v for k, v in state.items()}
    elif isinstance(obj, dict):  # a bare {'word2idx', 'idx2word', 'idx'} dict
        fields = {_text(k): v for k, v in obj.items()}
    else:
        raise DataError(path, f"holds a {type(obj).__name__}, not an official Vocabulary",
                        "give the *_vocab.pkl of the official release")
    idx2word = fields.get("idx2word")
    word2idx = fields.get("word2idx")
    if isinstance(idx2word, dict) and idx2word:
        table = {int(i): _text(w) for i, w in idx2word.items()}
    elif isinstance(word2idx, dict) and word2idx:
        table = {int(i): _text(w) for w, i in word2idx.items()}
    else:
        raise DataError(path, "the pickled Vocabulary has no idx2word/word2idx dict", "give the official *_vocab.pkl")
    n = len(table)
    if sorted(table) != list(range(n)):
        raise DataError(path, f"the pickled vocabulary's ids are not 0..{n - 1}", "give the official *_vocab.pkl")
    return [table[i] for i in range(n)]
