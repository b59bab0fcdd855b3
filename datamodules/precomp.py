"""LightningDataModule over the standard precomputed-feature layout."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from .datasets import CaptionPairs, ImageWithCaptions, collate
from .errors import LAYOUT_HELP, DataError
from .layout import SplitData, load_split, split_paths
from .prepare import ParseTable, build_vocab, ensure_parsed, parse_path, vocab_filename
from .labels import LabelVocabulary, check_lemmatize, load_or_build
from .text import Vocabulary


class PrecompDataModule(L.LightningDataModule):
    """Serves precomputed bottom-up region features, captions and (optionally) boxes, POS tags and
    dependency graphs, in the layout SCAN distributed.

    Args:
        root: folder holding {split}_ims.npy, {split}_caps.txt (and {split}_boxes.npy).
        train_split / val_split / test_split: split names (Flickr30K: train, dev, test; COCO: train, dev, testall).
        val_max_images: validate on the first this-many images of val_split (1,000 as in the standard code).
        test_max_images: likewise for test (None = all; COCO testall = 5K, folds of 1K are reported too).
        num_regions / feature_dim: expected feature shape [N, num_regions, feature_dim].
        with_boxes / with_pos / with_graphs: also serve region boxes / UPOS tags / dependency adjacency.
        with_labels: also serve each image's semantic label set as a multi-hot `labels` [B, num_labels]
            (CASC Sec. III-C1: top-num_labels words of the label_pos groups in the training captions), and each
            caption's own label vector `caption_labels` [C, num_labels] (the only label input a test-time score
            may read); positive weights p_c of Eq. (11) are `label_pos_weights`.
        label_stopwords: drop English stopwords from the labels (released CASC code); label_lemmatize: count
            lemmas instead of surface tokens (not available: the parse files store no lemmas; raises).
        parser: 'spacy' or 'stanza' backend for POS tags and graphs.
        subword_tokenizer: a transformers tokenizer name or folder (e.g. bert-base-uncased): also serve its
            sub-word ids, aligned with the zoo's word positions (for BERT text encoders).
        vocab_path: a vocabulary JSON (SCAN format); default <cache_dir>/vocab.min<vocab_min_count>.json, built
            from the training captions.
        vocab_min_count: minimum count of a word to enter the vocabulary (SCAN: 4).
        cache_dir: where artifacts are written (default: root).
        auto_prepare: build missing vocabulary/parses in prepare_data instead of failing.
    """

    def __init__(self, root: str, train_split: str = "train", val_split: str = "dev", test_split: str = "test",
                 val_max_images: int | None = 1000, test_max_images: int | None = None, caps_per_image: int = 5,
                 num_regions: int = 36, feature_dim: int = 2048, with_boxes: bool = False, with_pos: bool = False,
                 with_graphs: bool = False, with_labels: bool = False, label_pos: str = "nn", num_labels: int = 500,
                 label_stopwords: bool = True, label_lemmatize: bool = False,
                 parser: str = "spacy", subword_tokenizer: str | None = None, vocab_path: str | None = None,
                 vocab_min_count: int = 4, cache_dir: str | None = None, auto_prepare: bool = True,
                 batch_size: int = 128, eval_batch_size: int = 128, num_workers: int = 2):
        super().__init__()
        self.root = Path(root)
        self.splits = {"fit": train_split, "val": val_split, "test": test_split}
        self.max_images = {"fit": None, "val": val_max_images, "test": test_max_images}
        self.caps_per_image, self.num_regions, self.feature_dim = caps_per_image, num_regions, feature_dim
        self.with_boxes, self.with_pos, self.with_graphs = with_boxes, with_pos, with_graphs
        self.with_labels, self.label_pos, self.num_labels = with_labels, label_pos, num_labels
        self.label_stopwords, self.label_lemmatize = label_stopwords, label_lemmatize
        if with_labels:
            check_lemmatize(label_lemmatize)
        self._labels: LabelVocabulary | None = None
        self.parser = parser
        self.subword_tokenizer = subword_tokenizer
        self._subword_tok = None
        self.cache_dir = Path(cache_dir) if cache_dir else self.root
        self.vocab_path = Path(vocab_path) if vocab_path else self.cache_dir / vocab_filename(vocab_min_count)
        self.vocab_min_count = vocab_min_count
        self.auto_prepare = auto_prepare
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self._vocab: Vocabulary | None = None
        self._data: dict[str, SplitData] = {}
        self._datasets: dict[str, object] = {}

    # ---- artifacts ----------------------------------------------------------------------------------
    @property
    def needs_parses(self) -> bool:
        return self.with_pos or self.with_graphs or self.with_labels

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise DataError(self.root, "data folder not found", LAYOUT_HELP)

    def _check_writable(self) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        if not os.access(self.cache_dir, os.W_OK):
            raise DataError(self.cache_dir, "cannot write the vocabulary/parse files here (read-only)",
                            "set data.cache_dir to a writable folder, or run `zoo-prepare --cache-dir ...` once")

    def prepare_data(self) -> None:
        """Runs on one process per node: builds what is missing (vocabulary, parses)."""
        self._check_root()
        missing_parses = self.needs_parses and not all(
            parse_path(self.cache_dir, self.splits[s], self.parser).exists() for s in ("fit", "val", "test"))
        if (not self.vocab_path.exists() or missing_parses) and self.auto_prepare:
            self._check_writable()
        if not self.vocab_path.exists():
            if not self.auto_prepare:
                raise DataError(self.vocab_path, "vocabulary not found", "run `zoo-prepare --root <data>`")
            caps = split_paths(self.root, self.splits["fit"])["caps"]
            rank_zero_info(f"building the vocabulary from {caps} -> {self.vocab_path}")
            build_vocab(caps, self.vocab_path, self.vocab_min_count)
        if self.needs_parses:
            for stage in ("fit", "val", "test"):
                split = self.splits[stage]
                # a split without captions fails later, in setup, with the layout error
                if split_paths(self.root, split)["caps"].exists() and self.auto_prepare:
                    ensure_parsed(self.root, self.cache_dir, split, self.parser)

    @property
    def subword_tokenizer_obj(self):
        if self.subword_tokenizer is None:
            return None
        if self._subword_tok is None:
            try:
                from transformers import AutoTokenizer

                self._subword_tok = AutoTokenizer.from_pretrained(self.subword_tokenizer)
            except Exception as e:
                raise DataError(self.subword_tokenizer, f"cannot load this transformers tokenizer ({type(e).__name__})",
                                "give a local folder holding tokenizer files (e.g. a saved bert-base-uncased) or a "
                                "hub name on a machine that can download it") from None
            if not getattr(self._subword_tok, "is_fast", False):
                raise DataError(self.subword_tokenizer, "a fast (Rust) tokenizer is needed for word alignment",
                                "use a tokenizer folder with tokenizer.json")
        return self._subword_tok

    @property
    def label_path(self) -> Path:
        return self.cache_dir / f"labels.{self.label_pos}.{self.num_labels}.{self.parser}.json"

    @property
    def labels(self) -> LabelVocabulary:
        """The label dictionary, built from the training split's parses on first use; the cached file is
        rebuilt when its source (captions, parses, settings) changed."""
        if self._labels is None:
            train = self.split_data("fit")
            parses = ParseTable(parse_path(self.cache_dir, train.split, self.parser), train.all_captions)
            self._labels = load_or_build(self.label_path, train.captions, parses, groups=self.label_pos,
                                         top_k=self.num_labels, stopwords=self.label_stopwords,
                                         lemmatize=self.label_lemmatize, parser=self.parser,
                                         caps_per_image=self.caps_per_image)
        return self._labels

    @property
    def label_pos_weights(self):
        """CASC Eq. (11) positive weights p_c = #neg / #pos over the training images, as a float tensor [K]."""
        import torch

        return torch.from_numpy(self.labels.pos_weights.copy())

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            if not self.vocab_path.exists():
                self.prepare_data()  # used outside a Trainer
            self._vocab = Vocabulary.load(self.vocab_path)
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # ---- splits -------------------------------------------------------------------------------------
    def split_data(self, stage: str) -> SplitData:
        if stage not in self._data:
            self._check_root()
            self._data[stage] = load_split(self.root, self.splits[stage], num_regions=self.num_regions,
                                           feature_dim=self.feature_dim, caps_per_image=self.caps_per_image,
                                           with_boxes=self.with_boxes, max_images=self.max_images[stage])
        return self._data[stage]

    def dataset(self, stage: str):
        if stage not in self._datasets:
            data = self.split_data(stage)
            parses = None
            if self.needs_parses:
                parses = ParseTable(parse_path(self.cache_dir, data.split, self.parser), data.all_captions)
            cls = CaptionPairs if stage == "fit" else ImageWithCaptions
            image_labels = caption_labels = None
            if self.with_labels:
                image_labels = self.labels.image_labels(data.captions, parses, self.caps_per_image)
                caption_labels = self.labels.caption_labels(data.captions, parses)
            self._datasets[stage] = cls(data, self.vocab, self.with_boxes, parses, self.with_pos, self.with_graphs,
                                        image_labels, len(self.labels) if self.with_labels else 0,
                                        self.subword_tokenizer_obj, caption_labels=caption_labels)
        return self._datasets[stage]

    def setup(self, stage: str) -> None:
        needed = {"fit": ("fit", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}[stage]
        for s in needed:
            self.dataset(s)

    def num_eval_images(self, stage: str) -> int:
        return self.split_data(stage).n_images

    def describe(self, stage: str) -> str:
        d = self.split_data(stage)
        return f"{self.root.name}/{d.split} ({d.n_images} images, {len(d.captions)} captions)"

    # ---- loaders ------------------------------------------------------------------------------------
    def _loader(self, stage: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(self.dataset(stage), batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=partial(collate, with_pos=self.with_pos, with_graphs=self.with_graphs),
                          persistent_workers=self.num_workers > 0, pin_memory=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
