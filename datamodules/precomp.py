"""LightningDataModule over the standard precomputed-feature layout."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from .datasets import CaptionPairs, ImageWithCaptions, collate
from .errors import DataError
from .hub import resolve_pretrained
from .layout import SplitData, check_root, load_split, read_captions, scan_features_cached, split_paths
from .prepare import (ParseTable, cache_lock, captions_digest, ensure_parsed, load_or_build_vocab, parse_is_current,
                      parse_path, read_caption_files, read_parse_meta, vocab_filename, vocab_is_current)
from .labels import ASSIGNMENTS, COUNTS_FROM, LabelVocabulary, check_lemmatize, load_or_build
from .text import Vocabulary

TRAIN_FEATURE_STORES = ("mmap", "memory", "memory_fp16", "device_fp16")


class EpochShuffleSampler(Sampler):
    """Random order that depends only on (seed, epoch): a run resumed from a checkpoint sees the same batches
    as an uninterrupted one (a plain RandomSampler draws from the global RNG, which a resume does not restore).
    Lightning calls set_epoch at every epoch start and wraps it for DDP."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return g

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator()).tolist())


def check_sizes(**sizes: int) -> None:
    """Counts below 1 are errors here, not a ZeroDivisionError (caps_per_image 0) or a non-finite loss
    (num_regions 0) later."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataError(None, f"data.{name} is {v!r}", f"data.{name} must be a whole number >= 1")


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
        label_assignment: which tokens give an image (or caption) its labels: 'dictionary' (released CASC code,
            data.py:72-76: every token that is in the label dictionary, whatever its part of speech there) or
            'pos' (only tokens tagged with one of label_pos's parts of speech in that caption).
        label_counts_from: captions the dictionary is counted over: 'train+dev' (released, vocab.py:65-85: the
            training and the whole val_split caption files) or 'train'. Positive weights always come from the
            training images.
        parser: 'spacy' or 'stanza' backend for POS tags and graphs.
        subword_tokenizer: a transformers tokenizer name or folder (e.g. bert-base-uncased): also serve its
            sub-word ids, aligned with the zoo's word positions (for BERT text encoders).
        vocab_path: a vocabulary JSON (SCAN format) to use as it is; it must exist. Default
            <cache_dir>/vocab.min<vocab_min_count>.json, built from the training captions and rebuilt whenever
            they change.
        vocab_min_count: minimum count of a word to enter the vocabulary (SCAN: 4).
        vocab_from: captions the default vocabulary is built from: 'train' or 'train+dev' (the training and the
            whole val_split caption files, as CASC's released code: Code_CASC vocab.py:9-10; the CASC recipes).
        max_unk_rate: stop when more than this share of a split's words are <unk> (a vocabulary of other data).
        check_features: scan each split's features for NaN/Inf (error), all-zero and huge rows (warnings)
            before training starts; the result is cached per file version, so it costs nothing the second time.
        shuffle_seed: training order seed (default: the run's seed_everything seed); the order depends only on
            (seed, epoch), so a resumed run repeats an uninterrupted one.
        train_features: where the training split's features live while training: 'mmap' (default: read from
            the memory-mapped .npy per item), 'memory' (read into RAM once, float32), 'memory_fp16' (RAM, float16:
            half the memory and half the bytes per batch transfer; cast to float32 on the device), 'device_fp16'
            (the whole split on the training device in float16 -- COCO train is 16.7 GB -- batches carry only
            image ids and are filled after the transfer, so the loader never moves features). Evaluation
            splits are always read from the memory map.
        pin_memory: pin training/evaluation batches (page-locked host memory, faster copies to a GPU; only
            when CUDA is available).
        cache_dir: where artifacts are written (default: root).
        auto_prepare: build missing vocabulary/parses in prepare_data instead of failing.
    """

    def __init__(self, root: str, train_split: str = "train", val_split: str = "dev", test_split: str = "test",
                 val_max_images: int | None = 1000, test_max_images: int | None = None, caps_per_image: int = 5,
                 num_regions: int = 36, feature_dim: int = 2048, with_boxes: bool = False, with_pos: bool = False,
                 with_graphs: bool = False, with_labels: bool = False, label_pos: str = "nn", num_labels: int = 500,
                 label_stopwords: bool = True, label_lemmatize: bool = False, label_assignment: str = "dictionary",
                 label_counts_from: str = "train+dev", parser: str = "spacy", subword_tokenizer: str | None = None,
                 vocab_path: str | None = None, vocab_min_count: int = 4, vocab_from: str = "train",
                 max_unk_rate: float = 0.3, check_features: bool = True,
                 cache_dir: str | None = None, auto_prepare: bool = True, batch_size: int = 128,
                 eval_batch_size: int = 128, num_workers: int = 2, shuffle_seed: int | None = None,
                 train_features: str = "mmap", pin_memory: bool = False):
        super().__init__()
        check_sizes(caps_per_image=caps_per_image, num_regions=num_regions, feature_dim=feature_dim,
                    batch_size=batch_size, eval_batch_size=eval_batch_size)
        if train_features not in TRAIN_FEATURE_STORES:
            raise ValueError(f"data.train_features must be one of {', '.join(TRAIN_FEATURE_STORES)}, "
                             f"got {train_features!r}")
        self.train_features, self.pin_memory = train_features, pin_memory
        self._train_store: torch.Tensor | None = None  # device_fp16: the training features, moved on first use
        self.root = Path(root)
        self.splits = {"fit": train_split, "val": val_split, "test": test_split}
        self.max_images = {"fit": None, "val": val_max_images, "test": test_max_images}
        self.caps_per_image, self.num_regions, self.feature_dim = caps_per_image, num_regions, feature_dim
        self.with_boxes, self.with_pos, self.with_graphs = with_boxes, with_pos, with_graphs
        self.with_labels, self.label_pos, self.num_labels = with_labels, label_pos, num_labels
        self.label_stopwords, self.label_lemmatize = label_stopwords, label_lemmatize
        self.label_assignment, self.label_counts_from = label_assignment, label_counts_from
        if with_labels:
            check_lemmatize(label_lemmatize)
            if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
                raise DataError(None, f"data.num_labels must be a whole number of at least 1, got {num_labels!r}",
                                "give the dictionary size (the paper's 500); for CASC without labels use "
                                "model.global_branch: none")
            if label_assignment not in ASSIGNMENTS:
                raise DataError(None, f"unknown data.label_assignment {label_assignment!r}",
                                f"use one of {list(ASSIGNMENTS)}")
            if label_counts_from not in COUNTS_FROM:
                raise DataError(None, f"unknown data.label_counts_from {label_counts_from!r}",
                                f"use one of {list(COUNTS_FROM)}")
        self._labels: LabelVocabulary | None = None
        self.parser = parser
        self.subword_tokenizer = subword_tokenizer
        self._subword_tok = None
        self.cache_dir = Path(cache_dir) if cache_dir else self.root
        self.explicit_vocab = vocab_path is not None
        if vocab_from not in ("train", "train+dev"):
            raise DataError(None, f"unknown data.vocab_from {vocab_from!r}", "use 'train' or 'train+dev'")
        self.vocab_from = vocab_from
        default_name = vocab_filename(vocab_min_count)
        if vocab_from != "train":
            default_name = default_name.replace(".json", f".{vocab_from}.json")
        self.vocab_path = Path(vocab_path) if vocab_path else self.cache_dir / default_name
        self.vocab_min_count = vocab_min_count
        self.max_unk_rate, self.check_features = max_unk_rate, check_features
        self.shuffle_seed = shuffle_seed
        self.auto_prepare = auto_prepare
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self._vocab: Vocabulary | None = None
        self._prepared = False  # prepare_data ran in this process (its checks read every caption file)
        self._data: dict[str, SplitData] = {}
        self._datasets: dict[str, object] = {}

    # ---- artifacts ----------------------------------------------------------------------------------
    @property
    def needs_parses(self) -> bool:
        return self.with_pos or self.with_graphs or self.with_labels

    def _check_root(self) -> None:
        check_root(self.root)

    def _check_writable(self) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        if not os.access(self.cache_dir, os.W_OK):
            raise DataError(self.cache_dir, "cannot write the vocabulary/parse files here (read-only)",
                            "set data.cache_dir to a writable folder, or run `zoo-prepare --cache-dir ...` once")

    def prepare_data(self) -> None:
        """Runs on one process per node: builds what is missing or stale (vocabulary, parses)."""
        self._prepared = True
        self._check_root()
        if self.explicit_vocab:
            if not self.vocab_path.is_file():  # never build a vocabulary at a mistyped path
                Vocabulary.load(self.vocab_path)
        elif not self.auto_prepare:
            if not self.vocab_path.exists():
                raise DataError(self.vocab_path, "vocabulary not found", "run `zoo-prepare --root <data>`")
        if not self.auto_prepare or not self._artifacts_to_build():
            return
        self._check_writable()
        with cache_lock(self.cache_dir):  # one writer per cache folder (another run or zoo-prepare waits)
            if not self.explicit_vocab:
                caps = self._vocab_sources()
                if not self.vocab_path.exists():
                    rank_zero_info(f"building the vocabulary from {' + '.join(map(str, caps))} -> {self.vocab_path}")
                load_or_build_vocab(self.vocab_path, caps if len(caps) > 1 else caps[0], self.vocab_min_count)
            for split in self._parsed_splits():
                ensure_parsed(self.root, self.cache_dir, split, self.parser)

    def _vocab_sources(self) -> list[Path]:
        """Caption files the default vocabulary is counted over (data.vocab_from)."""
        splits = ["fit", "val"] if self.vocab_from == "train+dev" else ["fit"]
        return [split_paths(self.root, self.splits[s])["caps"] for s in splits]

    def _parsed_splits(self) -> list[str]:
        # a split without captions fails later, in setup, with the layout error
        if not self.needs_parses:
            return []
        splits = dict.fromkeys(self.splits[s] for s in ("fit", "val", "test"))
        return [s for s in splits if split_paths(self.root, s)["caps"].exists()]

    def _artifacts_to_build(self) -> list[Path]:
        """Artifacts missing or made from other captions/tokenizer (checked without writing anything, so a
        read-only data folder with fresh artifacts needs no cache_dir)."""
        todo = []
        caps = self._vocab_sources()
        if not self.explicit_vocab:
            if not self.vocab_path.exists():
                todo.append(self.vocab_path)
            elif all(c.exists() for c in caps):
                vocab = Vocabulary.load(self.vocab_path)
                source = caps if len(caps) > 1 else caps[0]
                if vocab.meta is not None and not vocab_is_current(vocab, read_caption_files(source), source,
                                                                    self.vocab_min_count):
                    todo.append(self.vocab_path)
        for split in self._parsed_splits():
            path = parse_path(self.cache_dir, split, self.parser)
            meta = read_parse_meta(path) if path.exists() else None
            if meta is None or not parse_is_current(meta, read_captions(split_paths(self.root, split)["caps"])):
                todo.append(path)
        return todo

    @property
    def subword_tokenizer_obj(self):
        if self.subword_tokenizer is None:
            return None
        if self._subword_tok is None:
            try:
                from transformers import AutoTokenizer

                self._subword_tok = AutoTokenizer.from_pretrained(resolve_pretrained(self.subword_tokenizer))
            except Exception as e:
                why = f": {e}" if isinstance(e, ValueError) else ""  # resolve_pretrained says why
                raise DataError(self.subword_tokenizer, f"cannot load this transformers tokenizer ({type(e).__name__}{why})",
                                "give a local folder holding tokenizer files (e.g. a saved bert-base-uncased) or a "
                                "hub name on a machine that can download it") from None
            if not getattr(self._subword_tok, "is_fast", False):
                raise DataError(self.subword_tokenizer, "a fast (Rust) tokenizer is needed for word alignment",
                                "use a tokenizer folder with tokenizer.json")
        return self._subword_tok

    @property
    def label_path(self) -> Path:
        return self.cache_dir / (f"labels.{self.label_pos}.{self.num_labels}.{self.parser}."
                                 f"{self.label_assignment}.{self.label_counts_from}.json")

    @property
    def labels(self) -> LabelVocabulary:
        """The label dictionary, built from the training split's parses on first use; the cached file is
        rebuilt when its source (captions, parses, settings) changed."""
        if self._labels is None:
            train = self.split_data("fit")
            parses = ParseTable(parse_path(self.cache_dir, train.split, self.parser), train.all_captions)
            extra = []
            if self.label_counts_from == "train+dev":  # the whole dev caption file, as released
                dev = self.splits["val"]
                dev_caps = read_captions(split_paths(self.root, dev)["caps"])
                extra.append((dev_caps, ParseTable(parse_path(self.cache_dir, dev, self.parser), dev_caps)))
            self._labels = load_or_build(self.label_path, train.captions, parses, groups=self.label_pos,
                                         top_k=self.num_labels, stopwords=self.label_stopwords,
                                         lemmatize=self.label_lemmatize, parser=self.parser,
                                         caps_per_image=self.caps_per_image, assignment=self.label_assignment,
                                         extra=extra)
        return self._labels

    @property
    def label_pos_weights(self):
        """CASC Eq. (11) positive weights p_c = #neg / #pos over the training images, as a float tensor [K]."""
        import torch

        return torch.from_numpy(self.labels.pos_weights.copy())

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            if not self._prepared:  # used outside a Trainer (or on a rank that did not prepare)
                self.prepare_data()
            vocab = Vocabulary.load(self.vocab_path)
            caps = split_paths(self.root, self.splits["fit"])["caps"]
            if self.explicit_vocab and vocab.meta is not None and caps.exists() \
                    and vocab.meta.get("digest") != captions_digest(read_captions(caps)):
                rank_zero_warn(f"data.vocab_path {self.vocab_path} was built from other captions than {caps} "
                               f"({vocab.meta.get('source')}); the <unk> check below tells whether they still fit")
            self._vocab = vocab
        return self._vocab

    def use_vocabulary(self, vocab: Vocabulary) -> None:
        """Serve token ids of this vocabulary (e.g. the one a checkpoint was trained with)."""
        self._vocab = vocab
        self._datasets.clear()

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # ---- splits -------------------------------------------------------------------------------------
    def split_data(self, stage: str) -> SplitData:
        if stage not in self._data:
            self._check_root()
            data = load_split(self.root, self.splits[stage], num_regions=self.num_regions,
                              feature_dim=self.feature_dim, caps_per_image=self.caps_per_image,
                              with_boxes=self.with_boxes, max_images=self.max_images[stage])
            if self.check_features:
                self._scan(data)
            self._data[stage] = data
        return self._data[stage]

    def _scan(self, data: SplitData) -> None:
        """NaN/Inf rows stop the run here, before training, instead of inside a DataLoader worker mid-epoch."""
        cache = self.cache_dir if os.access(self.cache_dir, os.W_OK) else data.root
        scan = scan_features_cached(data.paths["ims"], cache)
        scan.raise_if_bad(data.paths["ims"])
        for w in scan.warnings(data.paths["ims"]):
            rank_zero_warn(w)

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
            ds = cls(data, self.vocab, self.with_boxes, parses, self.with_pos, self.with_graphs,
                     image_labels, len(self.labels) if self.with_labels else 0, self.subword_tokenizer_obj,
                     caption_labels=caption_labels)
            self._check_unknown_words(ds, data)
            if stage == "fit" and self.train_features != "mmap":
                held = data.hold_in_memory(np.float32 if self.train_features == "memory" else np.float16)
                if self.train_features == "device_fp16":
                    ds.features_on_device = True
                    self._train_store = torch.from_numpy(held)
            self._datasets[stage] = ds
        return self._datasets[stage]

    def _check_unknown_words(self, ds, data: SplitData) -> None:
        rate = ds.tokens.unk_rate(self.vocab)
        rank_zero_info(f"{data.paths['caps'].name}: {100 * rate:.2f}% of words are <unk> under {self.vocab_path.name}")
        if rate > self.max_unk_rate:
            raise DataError(self.vocab_path, f"{100 * rate:.0f}% of the words of {data.paths['caps']} are <unk> under "
                            "this vocabulary: it was built from other data (or another tokenizer)",
                            "drop data.vocab_path to build the vocabulary from this training split, or point it at the "
                            f"vocabulary of this data (to accept the rate, raise data.max_unk_rate above {rate:.2f})")

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
        ds = self.dataset(stage)
        sampler = None
        if shuffle:
            seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = self.train_sampler(len(ds), seed)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=partial(collate, with_pos=self.with_pos, with_graphs=self.with_graphs),
                          persistent_workers=self.num_workers > 0,
                          pin_memory=self.pin_memory and torch.cuda.is_available())

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """train_features device_fp16: the batch's features gathered from the split held on the device;
        float16 features (memory_fp16 / device_fp16) become float32 here, after the (half-size) transfer."""
        if "images" not in batch and self._train_store is not None and "image_ids" in batch:
            ids = batch["image_ids"]
            if self._train_store.device != ids.device:
                self.check_device_room(self._train_store, ids.device)
                self._train_store = self._train_store.to(ids.device)
            batch["images"] = self._train_store[ids]
        if "images" in batch and batch["images"].dtype == torch.float16:
            batch["images"] = batch["images"].float()
        return batch

    def check_device_room(self, store: torch.Tensor, device: torch.device, free_bytes: int | None = None) -> None:
        """device_fp16: a clear error, before CUDA's own out-of-memory one, when the training split would leave
        the device less than a quarter of its free memory for the model (free_bytes overrides the measurement)."""
        if device.type != "cuda" and free_bytes is None:
            return
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0]
        need = store.numel() * store.element_size()
        if need > 0.75 * free_bytes:
            gib = 2.0 ** 30
            raise DataError(self.split_data("fit").paths["ims"],
                            f"data.train_features: device_fp16 needs {need / gib:.1f} GiB on {device} for the training "
                            f"features, but only {free_bytes / gib:.1f} GiB are free (at most 75 % may go to them)",
                            "use data.train_features: memory_fp16 (float16 in RAM, half-size pinned transfers: set "
                            "data.pin_memory: true) or mmap, or a device with more free memory")

    def train_sampler(self, n: int, seed: int) -> Sampler:
        """The training order over the n caption-image pairs (a subclass may group them: SynthScenes twins)."""
        return EpochShuffleSampler(n, seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("fit", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
