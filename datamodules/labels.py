"""Semantic label sets (CASC Sec. III-C1): the top-K most frequent words of chosen parts of speech in the
training captions form the label dictionary; an image's labels are the union over its captions.

Part-of-speech groups follow the paper's label types: 'nn' (nouns, NN* = UPOS NOUN/PROPN, the paper's
"500 nn"), 'vb' (verbs), 'jj' (adjectives), 'cd' (numbers); combine with '+', e.g. 'nn+vb+jj+cd'.

As in the authors' released code: surface tokens (lower-cased, no lemmatisation), English stopwords removed
(`stopwords=False` keeps them). Lemmatisation (`lemmatize=True`) would need the parser's lemmas, which the
parse files do not store: asking for it raises a clear DataError instead of silently using surface forms.

Two label readings exist and must not be mixed up:
- training targets: an image's label set = union over its (training) captions (`image_labels`);
- test time: a caption's label vector comes from that caption's own words only (`caption_labels`); the
  union over a test image's captions would leak the ground-truth pairing into retrieval and is never
  offered to a model's scorer.

Which words give an image its labels (`assignment`): 'dictionary' (released, Code_CASC data.py:72-76) marks
every token that is in the label dictionary, whatever its part of speech in that caption ("a *sign* reading
stop" and "people *sign* papers" both give `sign` with 'nn'); 'pos' marks only tokens tagged with the
dictionary's parts of speech in that caption. Where the dictionary is counted (`counts_from`): over the
training captions, or the training and dev captions (released, Code_CASC vocab.py:65-85). The released code
also joins an image's five captions without a separator before tokenising (data.py:57-58), which glues a
caption's last word to the next caption's first; the zoo tokenises captions one by one (not reproduced).

The artifact (labels.<pos>.<K>.<parser>.<assignment>.<counts_from>.json) records what it was built from
(captions digest, parse digest,
parser, settings) and is rebuilt when any of them changes. It also caches the positive weights of Eq. (11):
p_c = #negatives / #positives of label c over the training images.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import DataError
from .parsing import UPOS_ID
from .prepare import ParseTable, captions_digest
from .text import tokenize

POS_GROUPS = {"nn": ("NOUN", "PROPN"), "vb": ("VERB",), "jj": ("ADJ",), "cd": ("NUM",)}
FORMAT_VERSION = 3
ASSIGNMENTS = ("dictionary", "pos")
COUNTS_FROM = ("train+dev", "train")

# English stopwords (the NLTK list, which the released code filters with), plus the zoo tokenizer's pieces
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom this that these those am is are was were be
been being have has had having do does did doing a an the and but if or because as until while of at by for with
about against between into through during before after above below to from up down in out on off over under again
further then once here there when where why how all any both each few more most other some such no nor not only own
same so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn hasn haven
isn ma mightn mustn needn shan shouldn wasn weren won wouldn 's 't
""".split())


def pos_ids(groups: str) -> set[int]:
    ids = set()
    for g in groups.split("+"):
        if g not in POS_GROUPS:
            raise DataError(None, f"unknown label part-of-speech group {g!r}", f"use {sorted(POS_GROUPS)} joined by '+'")
        ids |= {UPOS_ID[t] for t in POS_GROUPS[g]}
    return ids


def parses_digest(parses: ParseTable) -> str:
    """Fingerprint of a split's parses (a new parser version changes tags without changing the captions)."""
    h = hashlib.sha1()
    for a in (parses.offsets, parses.upos):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def check_lemmatize(lemmatize: bool) -> None:
    if lemmatize:
        raise DataError(None, "label lemmatisation is not available: the parse files store UPOS tags and heads, "
                        "not lemmas", "use data.label_lemmatize: false (the released code uses surface tokens)")


def _tagged_words(captions: list[str], parses: ParseTable, keep: set[int], start: int = 0, stopwords: bool = True):
    for k, cap in enumerate(captions):
        upos, _ = parses.get(start + k)
        for w, u in zip(tokenize(cap), upos):
            if int(u) in keep and not (stopwords and w in STOPWORDS):
                yield k, w


class LabelVocabulary:
    """The label dictionary plus what it was built from (`meta`) and the cached positive weights."""

    def __init__(self, words: list[str], groups: str, stopwords: bool = True, meta: dict | None = None,
                 pos_weights: list[float] | None = None, assignment: str = "dictionary"):
        if assignment not in ASSIGNMENTS:
            raise DataError(None, f"unknown label assignment {assignment!r}", f"use one of {list(ASSIGNMENTS)}")
        self.words, self.groups, self.stopwords, self.assignment = list(words), groups, stopwords, assignment
        self.index = {w: i for i, w in enumerate(self.words)}
        self.meta = dict(meta or {})
        self.pos_weights = None if pos_weights is None else np.asarray(pos_weights, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: list[str], parses: ParseTable, groups: str = "nn", top_k: int = 500,
              stopwords: bool = True, lemmatize: bool = False, assignment: str = "dictionary",
              extra: list[tuple[list[str], ParseTable]] = ()) -> "LabelVocabulary":
        """Top-k words of `groups` counted over `captions` (and the (captions, parses) sources of `extra`, e.g.
        the dev split: the released code counts over train + dev)."""
        check_lemmatize(lemmatize)
        keep = pos_ids(groups)
        counts = Counter()
        for caps, table in ((captions, parses), *extra):
            counts.update(w for _, w in _tagged_words(caps, table, keep, stopwords=stopwords))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        return cls([w for w, _ in ranked], groups, stopwords, assignment=assignment)

    def _sets(self, captions: list[str], parses: ParseTable, n_sets: int, per: int) -> list[np.ndarray]:
        sets: list[set[int]] = [set() for _ in range(n_sets)]
        if self.assignment == "dictionary":  # released: any token in the dictionary, whatever its tag here
            words = ((k, w) for k, cap in enumerate(captions) for w in tokenize(cap))
        else:  # 'pos': only where the caption's tagger gives the token one of the dictionary's parts of speech
            words = _tagged_words(captions, parses, pos_ids(self.groups), stopwords=self.stopwords)
        for k, w in words:
            if w in self.index:
                sets[k // per].add(self.index[w])
        return [np.array(sorted(s), dtype=np.int64) for s in sets]

    def image_labels(self, captions: list[str], parses: ParseTable, caps_per_image: int) -> list[np.ndarray]:
        """Label ids of each image (union over its captions), for the first len(captions) captions.

        Training targets only: on a test split this union is the ground truth of the pairing.
        """
        return self._sets(captions, parses, len(captions) // caps_per_image, caps_per_image)

    def caption_labels(self, captions: list[str], parses: ParseTable) -> list[np.ndarray]:
        """Label ids of each caption from its own words only (CASC Eq. (13), printed S_G: Y_T of a text T)."""
        return self._sets(captions, parses, len(captions), 1)

    def positive_weights(self, image_labels: list[np.ndarray]) -> np.ndarray:
        """CASC Eq. (11): p_c = #negatives / #positives of label c over the given (training) images.

        A label no image carries (possible only with a different split) gets p_c = #images (one positive assumed).
        """
        n = len(image_labels)
        pos = np.zeros(len(self), dtype=np.float64)
        for ids in image_labels:
            pos[ids] += 1
        pos = np.maximum(pos, 1.0)
        return ((n - pos) / pos).astype(np.float32)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        data = {"format": FORMAT_VERSION, "groups": self.groups, "stopwords": self.stopwords, "words": self.words,
                "assignment": self.assignment,
                "meta": self.meta,
                "pos_weights": None if self.pos_weights is None else [float(x) for x in self.pos_weights]}
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "LabelVocabulary":
        try:
            data = json.loads(path.read_text())
            return cls(data["words"], data["groups"], data.get("stopwords", True), data.get("meta"),
                       data.get("pos_weights"), data.get("assignment", "pos"))
        except (OSError, ValueError, KeyError) as e:
            raise DataError(path, f"cannot read the label dictionary ({e})", "delete it so it is rebuilt") from None


def label_source(captions: list[str], parses: ParseTable, *, groups: str, top_k: int, stopwords: bool,
                 lemmatize: bool, parser: str, caps_per_image: int, assignment: str = "dictionary",
                 extra: list[tuple[list[str], ParseTable]] = ()) -> dict:
    """What a label artifact depends on; a stored artifact whose `meta` differs is rebuilt."""
    return {"format": FORMAT_VERSION, "captions_digest": captions_digest(captions), "n_captions": len(captions),
            "parses_digest": parses_digest(parses), "parser": parser, "groups": groups, "top_k": top_k,
            "stopwords": stopwords, "lemmatize": lemmatize, "caps_per_image": caps_per_image,
            "assignment": assignment,
            "counted_also": [[captions_digest(c), parses_digest(t)] for c, t in extra]}


def load_or_build(path: Path, captions: list[str], parses: ParseTable, **settings) -> LabelVocabulary:
    """The label dictionary of these training captions (counted over them and `extra`): the cached file when it
    matches its source, else rebuilt (with the positive weights over the training images) and saved."""
    source = label_source(captions, parses, **settings)
    if path.exists():
        try:
            cached = LabelVocabulary.load(path)
            if cached.meta == source and cached.pos_weights is not None:
                return cached
        except DataError:
            pass  # unreadable: rebuild
    voc = LabelVocabulary.build(captions, parses, settings["groups"], settings["top_k"], settings["stopwords"],
                                settings["lemmatize"], settings.get("assignment", "dictionary"),
                                settings.get("extra", ()))
    voc.meta = source
    voc.pos_weights = voc.positive_weights(voc.image_labels(captions, parses, settings["caps_per_image"]))
    voc.save(path)
    return voc
