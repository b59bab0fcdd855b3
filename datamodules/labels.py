"""Semantic label sets (CASC Sec. III-C1): the top-K most frequent words of chosen parts of speech in the
training captions form the label dictionary; an image's labels are the union over its captions.

Part-of-speech groups follow the paper's label types: 'nn' (nouns, the paper's "500 nn"), 'vb' (verbs),
'jj' (adjectives), 'cd' (numbers); combine with '+', e.g. 'nn+vb+jj+cd'.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import DataError
from .parsing import UPOS_ID
from .prepare import ParseTable
from .text import tokenize

POS_GROUPS = {"nn": ("NOUN", "PROPN"), "vb": ("VERB",), "jj": ("ADJ",), "cd": ("NUM",)}


def pos_ids(groups: str) -> set[int]:
    ids = set()
    for g in groups.split("+"):
        if g not in POS_GROUPS:
            raise DataError(None, f"unknown label part-of-speech group {g!r}", f"use {sorted(POS_GROUPS)} joined by '+'")
        ids |= {UPOS_ID[t] for t in POS_GROUPS[g]}
    return ids


def _tagged_words(captions: list[str], parses: ParseTable, keep: set[int], start: int = 0):
    for k, cap in enumerate(captions):
        upos, _ = parses.get(start + k)
        for w, u in zip(tokenize(cap), upos):
            if int(u) in keep:
                yield k, w


class LabelVocabulary:
    def __init__(self, words: list[str], groups: str):
        self.words, self.groups = list(words), groups
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: list[str], parses: ParseTable, groups: str = "nn", top_k: int = 500) -> "LabelVocabulary":
        counts = Counter(w for _, w in _tagged_words(captions, parses, pos_ids(groups)))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        return cls([w for w, _ in ranked], groups)

    def image_labels(self, captions: list[str], parses: ParseTable, caps_per_image: int) -> list[np.ndarray]:
        """Label ids of each image (union over its captions), for the first len(captions) captions."""
        keep = pos_ids(self.groups)
        sets: list[set[int]] = [set() for _ in range(len(captions) // caps_per_image)]
        for k, w in _tagged_words(captions, parses, keep):
            if w in self.index:
                sets[k // caps_per_image].add(self.index[w])
        return [np.array(sorted(s), dtype=np.int64) for s in sets]

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"groups": self.groups, "words": self.words}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LabelVocabulary":
        try:
            data = json.loads(path.read_text())
            return cls(data["words"], data["groups"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(path, f"cannot read the label dictionary ({e})", "delete it so it is rebuilt") from None
