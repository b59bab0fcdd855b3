"""Pretrained BERT-family word features for CCCL Eq. (11) (the E of Sec. 3.2.3), pooled from sub-words to words.

The datamodule (data.subword_tokenizer) serves each caption's sub-word ids and, per sub-word, the zoo word
position it belongs to (0 = <start> for [CLS], n + 1 = <end> for [SEP], 1..n for the caption's words).
`pool_subwords` averages the sub-word vectors of each word so text nodes line up with the dependency parse;
[CLS]/[SEP] are dropped (they are no word of the caption).
"""
from __future__ import annotations

import torch
from torch import nn

SUBWORD_POOLING = ("mean", "first")


def pool_subwords(hidden: torch.Tensor, subword_to_word: torch.Tensor, subword_mask: torch.Tensor, n_words: int,
                  word_counts: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """hidden [C, T, h], subword_to_word [C, T] (word position 1..n_c; 0 / n_c + 1 = [CLS] / [SEP]), subword_mask
    [C, T], word_counts [C] = n_c -> word features [C, n_words, h], row k = word position k + 1 (0 where a word got no
    sub-word, and beyond n_c)."""
    if how not in SUBWORD_POOLING:
        raise ValueError(f"unknown sub-word pooling {how!r}: use one of {SUBWORD_POOLING}")
    c, t, h = hidden.shape
    idx = subword_to_word - 1  # word position k + 1 -> row k
    keep = subword_mask & (idx >= 0) & (idx < word_counts[:, None]) & (idx < n_words)
    if how == "first":  # keep only the first sub-word of each word
        prev = torch.cat([torch.full_like(idx[:, :1], -2), idx[:, :-1]], dim=1)
        keep = keep & (idx != prev)
    idx = torch.where(keep, idx, torch.full_like(idx, n_words))  # dropped sub-words go to a spill row
    w = keep.to(hidden.dtype)
    out = hidden.new_zeros(c, n_words + 1, h).scatter_add_(1, idx[..., None].expand(-1, -1, h), hidden * w[..., None])
    count = hidden.new_zeros(c, n_words + 1).scatter_add_(1, idx, w)
    return (out / count.clamp_min(1.0)[..., None])[:, :n_words]


class BertWordEncoder(nn.Module):
    """transformers AutoModel (a hub name such as bert-base-uncased, or a local folder) -> word features.

    The width d_E is read from the model config (768 for bert-base, 384 for all-MiniLM-L6-v2).
    finetune=False freezes the backbone (no gradients, kept in eval mode so dropout is off); True trains it
    (CCCL.configure_optimizers gives it its own learning rate).
    """

    def __init__(self, name_or_path: str, finetune: bool = True, pooling: str = "mean"):
        """name_or_path: best given as a folder; a method resolves hub names first (datamodules.hub), so that a
        name that cannot resolve fails at once rather than after the hub client's ~32 s of retries."""
        super().__init__()
        try:
            from transformers import AutoModel

            self.backbone = AutoModel.from_pretrained(name_or_path)
        except Exception as e:  # no such folder / hub offline / not a transformers model
            raise ValueError(f"cannot load the pretrained text model {name_or_path!r} ({type(e).__name__}: {e}); "
                             "give a local folder holding a transformers model (config.json + weights) or a hub name "
                             "on a machine that can download it, or set model.text_encoder: bigru") from None
        self.width = int(self.backbone.config.hidden_size)
        self.finetune = finetune
        self.pooling = pooling
        if pooling not in SUBWORD_POOLING:
            raise ValueError(f"unknown sub-word pooling {pooling!r}: use one of {SUBWORD_POOLING}")
        # from_pretrained returns the model in eval mode, and Lightning keeps every submodule's mode as it finds it
        # (it does not call .train() at fit start): a fine-tuned backbone would train without its dropout
        self.backbone.train(finetune)
        if not finetune:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune:
            self.backbone.eval()
        return self

    def forward(self, subword_ids: torch.Tensor, subword_mask: torch.Tensor, subword_to_word: torch.Tensor,
                n_words: int, word_counts: torch.Tensor) -> torch.Tensor:
        """-> [C, n_words, d_E]: the features of word positions 1..n_words (word_counts [C] real words each)."""
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            hidden = self.backbone(input_ids=subword_ids, attention_mask=subword_mask.long()).last_hidden_state
        return pool_subwords(hidden, subword_to_word, subword_mask, n_words, word_counts, self.pooling)
