"""Tokenizer and vocabulary.

The tokenizer reproduces the Treebank-style word tokenizer (NLTK's `word_tokenize` without its punkt
sentence splitter, which needs downloaded data) that built SCAN's released vocabularies, so those files map
real captions with few `<unk>`: contractions split ("man's" -> "man", "'s"; "don't" -> "do", "n't"),
punctuation split off, hyphenated words kept. Before that, text is cleaned the way real caption files need:
a UTF-8 byte-order mark is dropped, Unicode is NFC-normalised (so "café" is one word however it was typed),
curly quotes/apostrophes become ASCII ones, and everything is lower-cased. Letters of any script stay inside
words. TOKENIZER_VERSION is recorded in every artifact built from tokens (vocabulary, parses), so a change
here rebuilds them instead of silently misaligning.

The vocabulary file is SCAN's JSON format ({"word2idx", "idx2word", "idx"}), so SCAN's released vocabularies
load unchanged (and so do the official pickled `*_vocab.pkl` objects, through datamodules.vocab_pickle); files the zoo builds add a "zoo" entry recording what they were built from.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

from .errors import DataError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
TOKENIZER_VERSION = 2  # 1: the old regex tokenizer (apostrophes kept inside words, ASCII letters only)

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
                         "\ufeff": None, "\u200b": None})

# NLTK's NLTKWordTokenizer rules (Treebank), in order; the text is already lower case.
_STARTING_QUOTES = [(r'^"', "``"), (r"(``)", r" \1 "), (r'([ (\[{<])("|\'{2})', r"\1 `` "),
                    (r"(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 ")]
_PUNCTUATION = [(r"([:,])([^\d])", r" \1 \2"), (r"([:,])$", r" \1 "), (r"\.{2,}", r" \g<0> "),
                (r"[;@#$%&]", r" \g<0> "), (r"[\u2012-\u2015]", r" \g<0> "),
                (r'([^.])(\.)([\]\)}>"\']*)\s*$', r"\1 \2\3 "),  # only the final period
                (r"[?!]", r" \g<0> "), (r"([^'])' ", r"\1 ' "), (r"[*]", r" \g<0> "),
                (r"[\]\[(){}<>]", r" \g<0> "), (r"--", r" -- ")]
_ENDING_QUOTES = [(r"''", " '' "), (r'"', " '' "), (r"\s+", " "), (r"([^' ])('s|'m|'d|') ", r"\1 \2 "),
                  (r"([^' ])('ll|'re|'ve|n't) ", r"\1 \2 ")]
_CONTRACTIONS = [r"\b(can)(not)\b", r"\b(d)('ye)\b", r"\b(gim)(me)\b", r"\b(gon)(na)\b", r"\b(got)(ta)\b",
                 r"\b(lem)(me)\b", r"\b(more)('n)\b", r"\b(wan)(na)(?=\s)", r" ('t)(is)\b", r" ('t)(was)\b"]
_RULES_BEFORE = [(re.compile(a), b) for a, b in _STARTING_QUOTES + _PUNCTUATION]
_RULES_AFTER = [(re.compile(a), b) for a, b in _ENDING_QUOTES] + [(re.compile(a), r" \1 \2 ") for a in _CONTRACTIONS]


def clean_text(text: str) -> str:
    """BOM/zero-width characters dropped, NFC, ASCII quotes and apostrophes, lower case."""
    return unicodedata.normalize("NFC", text).translate(_QUOTES).lower()


def tokenize(text: str) -> list[str]:
    text = clean_text(text)
    for rx, sub in _RULES_BEFORE:
        text = rx.sub(sub, text)
    text = f" {text} "
    for rx, sub in _RULES_AFTER:
        text = rx.sub(sub, text)
    return text.split()


def unk_rate(token_ids, n_captions: int, unk_id: int) -> float:
    """Share of real words (not <start>/<end>) mapped to <unk>, from a flat array of encoded captions."""
    import numpy as np

    words = len(token_ids) - 2 * n_captions
    return float((np.asarray(token_ids) == unk_id).sum() / max(words, 1))


class Vocabulary:
    """Word <-> id. `meta` records what a zoo-built vocabulary came from (None for foreign files such as SCAN's):
    {"source": captions file name, "digest": sha1 of its captions, "min_count": N, "tokenizer": version}."""

    def __init__(self, words: Iterable[str], meta: dict | None = None):
        self.meta = meta
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
    def build(cls, captions: Iterable[str], min_count: int = 4, meta: dict | None = None) -> "Vocabulary":
        counts = Counter(t for c in captions for t in tokenize(c))
        # sorted by (-count, word): the same file on every rank and every machine
        words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
        return cls(words, meta)

    @classmethod
    def from_words(cls, idx2word: list[str]) -> "Vocabulary":
        """Exactly this id order (e.g. the vocabulary stored in a checkpoint)."""
        vocab = cls.__new__(cls)
        vocab.meta, vocab.idx2word = None, list(idx2word)
        vocab.word2idx = {w: i for i, w in enumerate(vocab.idx2word)}
        return vocab

    def unk_rate(self, captions: Iterable[str]) -> float:
        encoded = [self.encode(tokenize(c)) for c in captions]
        return unk_rate([i for ids in encoded for i in ids], len(encoded), self.word2idx[UNK])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        data = {"word2idx": self.word2idx, "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
                "idx": len(self)}
        if self.meta is not None:
            data["zoo"] = self.meta  # SCAN's loader ignores extra keys
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)  # atomic: concurrent readers never see half a file

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        if path.is_dir():
            raise DataError(path, "is a folder, not a vocabulary file", "point data.vocab_path at the JSON file itself")
        if path.suffix == ".pkl":  # the official pickled Vocabulary objects (SCAN, VSE++): restricted unpickler
            from .vocab_pickle import load_pickled_words

            vocab = cls.from_words(load_pickled_words(path))
            vocab._check_specials(path)
            return vocab
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            idx2word = data["idx2word"]
            if isinstance(idx2word, list):  # some re-exports store the id -> word map as a plain list
                words = [str(w) for w in idx2word]
            else:
                words = [idx2word[str(i)] for i in range(len(idx2word))]
        except FileNotFoundError:
            raise DataError(path, "vocabulary file not found", "check data.vocab_path for a typo, run `zoo-prepare "
                            "--root <data folder>`, or drop data.vocab_path to build it from the training captions") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(path, f"not a vocabulary JSON ({type(e).__name__}: {e})", "delete it so it is rebuilt, or "
                            "give a SCAN-format file with 'word2idx' and 'idx2word' (a dict id -> word, or a list)") from None
        vocab = cls.from_words(words)
        vocab.meta = data.get("zoo") if isinstance(data.get("zoo"), dict) else None
        vocab._check_specials(path)
        return vocab

    def _check_specials(self, path: Path) -> None:
        vocab = self
        for s in SPECIALS:
            if s not in vocab.word2idx:
                # SCAN's files have <pad>, <start>, <end>, <unk> at 0..3; anything else cannot be served
                raise DataError(path, f"vocabulary lacks the special token {s!r}",
                                "rebuild it with `zoo-prepare` (SCAN-format files with <pad> <start> <end> <unk> work)")
        if vocab.word2idx[PAD] != 0:
            raise DataError(path, "'<pad>' must have index 0", "rebuild the vocabulary with `zoo-prepare`")
