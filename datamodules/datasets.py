"""Datasets and the collate function.

Training items are captions (each paired with its image); evaluation items are images with all their
captions, so evaluation encodes every image once. Both produce the same batch keys:
  images [B, R, F] float, boxes [B, R, 4] (with_boxes), tokens [C, L] long (0 = pad), lengths [C],
  image_ids [B], caption_ids [C], pos [C, L] UPOS ids (with_pos), adjacency [C, L, L] dependency arcs,
  symmetric, no self loops (with_graphs); word positions include <start>/<end>, which have no arcs;
  labels [B, K] multi-hot semantic labels of each image, the union over its captions (with_labels; a training
  target: on evaluation splits it is the ground truth and no score may read it);
  caption_labels [C, K] multi-hot labels of each caption from its own words (with_labels);
  subword_ids / subword_mask / subword_to_word [C, T]: a transformers tokenizer's sub-words and the word
  position each belongs to (subword_tokenizer), for BERT-based text encoders.
In training B == C and row n of images belongs to caption n.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .layout import SplitData
from .prepare import ParseTable
from .text import UNK, Vocabulary, tokenize, unk_rate


def flatten_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows -> (flat int64 array, offsets [n + 1]); row k is flat[offsets[k]:offsets[k + 1]]."""
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in rows])]).astype(np.int64)
    flat = np.fromiter((t for x in rows for t in x), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


class EncodedCaptions:
    """All captions of a split as token ids in one flat array (cheap to share with worker processes)."""

    def __init__(self, captions: list[str], vocab: Vocabulary):
        self.flat, self.offsets = flatten_rows([vocab.encode(tokenize(c)) for c in captions])

    def __getitem__(self, k: int) -> np.ndarray:
        return self.flat[self.offsets[k] : self.offsets[k + 1]]

    def unk_rate(self, vocab: Vocabulary) -> float:
        return unk_rate(self.flat, len(self.offsets) - 1, vocab(UNK))


class SubwordCaptions:
    """Captions as a transformers tokenizer's sub-words (e.g. BERT WordPiece), aligned with the zoo's words.

    The tokenizer reads the zoo's own words (is_split_into_words), so sub-word k maps to word position
    word_index[k] in `tokens`/`pos`/`adjacency` (1..n; [CLS] -> 0 = <start>, [SEP] -> n + 1 = <end>).
    """

    def __init__(self, captions: list[str], tokenizer, max_length: int = 128):
        words = [tokenize(c) for c in captions]
        ids, index = [], []
        for a in range(0, len(words), 4096):
            enc = tokenizer(words[a : a + 4096], is_split_into_words=True, truncation=True, max_length=max_length)
            for n, row in enumerate(enc["input_ids"]):
                wid = enc.word_ids(n)
                last = len(words[a + n]) + 1
                ids.append(row)
                index.append([(0 if k == 0 else last) if w is None else w + 1 for k, w in enumerate(wid)])
        self.flat, self.offsets = flatten_rows(ids)
        self.flat_index, _ = flatten_rows(index)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.flat[a:b], self.flat_index[a:b]


class _Base(Dataset):
    def __init__(self, data: SplitData, vocab: Vocabulary, with_boxes: bool = False, parses: ParseTable | None = None,
                 with_pos: bool = False, with_graphs: bool = False, image_labels: list | None = None,
                 num_labels: int = 0, subword_tokenizer=None, caption_labels: list | None = None):
        self.data, self.with_boxes, self.parses = data, with_boxes, parses
        self.image_labels, self.num_labels, self.caption_labels = image_labels, num_labels, caption_labels
        self.with_pos, self.with_graphs = with_pos, with_graphs
        self.tokens = EncodedCaptions(data.captions, vocab)
        self.subwords = SubwordCaptions(data.captions, subword_tokenizer) if subword_tokenizer is not None else None
        self.features_on_device = False

    def _caption(self, k: int) -> dict:
        item = {"tokens": self.tokens[k], "caption_id": k}
        if self.subwords is not None:
            item["subword_ids"], item["subword_to_word"] = self.subwords[k]
        if self.caption_labels is not None:
            multi_hot = np.zeros(self.num_labels, dtype=np.float32)
            multi_hot[self.caption_labels[k]] = 1.0
            item["caption_labels"] = multi_hot
        if self.parses is not None:
            upos, heads = self.parses.get(k)
            n_words = len(self.tokens[k]) - 2
            if len(upos) != n_words:
                raise RuntimeError(f"parse of caption {k} has {len(upos)} words, tokenizer gives {n_words}; "
                                   "re-run zoo-prepare")
            item["upos"], item["heads"] = upos, heads
        return item

    def _image(self, i: int) -> dict:
        # features_on_device: the batch gets its features after the transfer (PrecompDataModule.on_after_batch_transfer)
        item = {"image_id": i} if self.features_on_device else {"image": self.data.image_features(i), "image_id": i}
        if self.with_boxes:
            item["boxes"] = self.data.image_boxes(i)
        if self.image_labels is not None:
            multi_hot = np.zeros(self.num_labels, dtype=np.float32)
            multi_hot[self.image_labels[i]] = 1.0
            item["labels"] = multi_hot
        return item


class CaptionPairs(_Base):
    """Training: one item per caption, with its image."""

    def __len__(self) -> int:
        return len(self.data.captions)

    def __getitem__(self, k: int) -> dict:
        return {**self._image(k // self.data.caps_per_image), "captions": [self._caption(k)]}


class ImageWithCaptions(_Base):
    """Evaluation: one item per image, with all of its captions."""

    def __len__(self) -> int:
        return self.data.n_images

    def __getitem__(self, i: int) -> dict:
        k = self.data.caps_per_image
        return {**self._image(i), "captions": [self._caption(c) for c in range(i * k, (i + 1) * k)]}


def collate(items: list[dict], with_pos: bool = False, with_graphs: bool = False) -> dict:
    caps = [c for it in items for c in it["captions"]]
    lengths = torch.tensor([len(c["tokens"]) for c in caps], dtype=torch.long)
    L = int(lengths.max())
    tokens = torch.zeros(len(caps), L, dtype=torch.long)
    for n, c in enumerate(caps):
        tokens[n, : len(c["tokens"])] = torch.from_numpy(np.asarray(c["tokens"]))
    batch = {
        "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.long),
        "tokens": tokens,
        "lengths": lengths,
        "caption_ids": torch.tensor([c["caption_id"] for c in caps], dtype=torch.long),
    }
    if "image" in items[0]:  # float32, or float16 from a held fp16 copy (cast on the device after the transfer)
        batch["images"] = torch.from_numpy(np.stack([it["image"] for it in items]))
    for key in ("boxes", "labels"):
        if key in items[0]:
            batch[key] = torch.from_numpy(np.stack([it[key] for it in items]))
    if "caption_labels" in caps[0]:
        batch["caption_labels"] = torch.from_numpy(np.stack([c["caption_labels"] for c in caps]))
    if "subword_ids" in caps[0]:
        T = max(len(c["subword_ids"]) for c in caps)
        sub = torch.zeros(len(caps), T, dtype=torch.long)
        to_word = torch.zeros(len(caps), T, dtype=torch.long)
        for n, c in enumerate(caps):
            sub[n, : len(c["subword_ids"])] = torch.from_numpy(c["subword_ids"])
            to_word[n, : len(c["subword_ids"])] = torch.from_numpy(c["subword_to_word"])
        batch["subword_ids"], batch["subword_to_word"] = sub, to_word
        batch["subword_mask"] = (torch.arange(T)[None] < torch.tensor([len(c["subword_ids"]) for c in caps])[:, None])
    if with_pos:
        pos = torch.zeros(len(caps), L, dtype=torch.long)
        for n, c in enumerate(caps):
            pos[n, 1 : 1 + len(c["upos"])] = torch.from_numpy(c["upos"].astype(np.int64))
        batch["pos"] = pos
    if with_graphs:
        adj = torch.zeros(len(caps), L, L, dtype=torch.float32)
        for n, c in enumerate(caps):
            heads = c["heads"].astype(np.int64)
            dep = np.flatnonzero(heads >= 0)
            if dep.size:  # word positions are shifted by one for <start>
                i, j = torch.from_numpy(dep + 1), torch.from_numpy(heads[dep] + 1)
                adj[n, i, j] = 1.0
                adj[n, j, i] = 1.0
        batch["adjacency"] = adj
    return batch
