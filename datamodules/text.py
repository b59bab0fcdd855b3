"""Tokenizer and vocabulary.

The tokenizer is a small deterministic regex (nltk's punkt data cannot be downloaded everywhere): lower
case, words with inner apostrophes/hyphens kept together, punctuation split off. The vocabulary file is
SCAN's JSON format ({"word2idx", "idx2word", "idx"}), so SCAN's released vocabularies load unchanged.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from .errors import DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class Vocabulary:
    def __init__(self, words: Iterable[str]):
        self.idx2word: list[str] = list(SPECIALS)
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(self.idx2word)}
        for w in words:
            if w not in self.word2idx:
                self.word2idx[w] = len(self.idx2word)
                self.idx2word.append(w)

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx[UNK])

    def encode(self, tokens: list[str]) -> list[int]:
        """SCAN's convention: <start> w1 ... wn <end>."""
        return [self.word2idx[START]] + [self(t) for t in tokens] + [self.word2idx[END]]

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> "Vocabulary":
        counts = Counter(t for c in captions for t in tokenize(c))
        # sorted by (-count, word): the same file on every rank and every machine
        words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
        return cls(words)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        data = {"word2idx": self.word2idx, "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
                "idx": len(self)}
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # atomic: concurrent readers never see half a file

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            idx2word = data["idx2word"]
            words = [idx2word[str(i)] for i in range(len(idx2word))]
        except FileNotFoundError:
            raise DataError(path, "vocabulary file not found", "run `zoo-prepare --root <data folder>` or "
                            "drop data.vocab_path to build it from the training captions") from None
        except (ValueError, KeyError) as e:
            raise DataError(path, f"not a vocabulary JSON ({e})", "delete it so it is rebuilt, or give "
                            "a SCAN-format file with 'word2idx' and 'idx2word'") from None
        vocab = cls.__new__(cls)
        vocab.idx2word = words
        vocab.word2idx = {w: i for i, w in enumerate(words)}
        for s in SPECIALS:
            if s not in vocab.word2idx:
                # SCAN's files have <pad>, <start>, <end>, <unk> at 0..3; anything else cannot be served
                raise DataError(path, f"vocabulary lacks the special token {s!r}",
                                "rebuild it with `zoo-prepare` (SCAN-format files with <pad> <start> <end> <unk> work)")
        if vocab.word2idx[PAD] != 0:
            raise DataError(path, "'<pad>' must have index 0", "rebuild the vocabulary with `zoo-prepare`")
        return vocab
