"""sm-LSTM: selective multimodal LSTM (Huang, Wang, Wang, CVPR 2017). No official code.

Regions -> FC + l2 (the instance candidates), words -> BiLSTM (directions summed) + l2; global context = the
l2-normalised means of the regions and of the real words; T = 3 steps of instance-aware saliency over the
regions and the words guided by the global context and the multimodal LSTM's state, whose last state is
scored by a two-layer perceptron (zoo.blocks.smlstm.SelectiveMultimodalLSTM). The score is pairwise: evaluation
scores it block by block like the other cross-attention methods. Loss: the bidirectional hinge ranking loss
(summed over negatives, margin 0.2).

CASC-sm (CASC Table VII): `label_constraint: true` adds CASC's label loss (Eqs. 10-12) on A^I = the mean over the
T steps of the selected region vectors a_t of the matched pair, A^T = that of the selected word vectors w_t.
"""
from __future__ import annotations

import torch


from ..blocks import RegionEncoder
from ..blocks.encoders import BiLSTMTextEncoder
from ..blocks.functional import l2_normalize, lengths_to_mask, masked_mean, use_reference
from ..blocks.smlstm import SelectiveMultimodalLSTM
from ..engine.module import Emb, RetrievalModule
from .label_constraint import LabelConstraintMixin


class SMLSTM(LabelConstraintMixin, RetrievalModule):
    """sm-LSTM.

    Args:
        vocab_size: word vocabulary size; None = taken from the datamodule at setup.
        feature_dim / embed_dim / word_dim: region features -> d; word embedding size.
        hidden_dim: the saliency layers' and the multimodal LSTM's hidden size; steps: T (3).
        label_constraint / label_settings: CASC's label constraint (CASC-sm); see zoo.methods.label_constraint.
    """

    def __init__(self, vocab_size: int | None = None, feature_dim: int = 2048, embed_dim: int = 512,
                 word_dim: int = 300, hidden_dim: int = 512, steps: int = 3, label_constraint: bool = False,
                 label_settings: dict | None = None, **loop_kwargs):
        loop_kwargs.setdefault("hardest_negative", False)  # sm-LSTM's ranking loss sums over the negatives
        super().__init__(**loop_kwargs)
        for name, value in (("feature_dim", feature_dim), ("embed_dim", embed_dim), ("word_dim", word_dim),
                            ("hidden_dim", hidden_dim), ("steps", steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SMLSTM {name} must be a whole number >= 1, got {value!r}")
        self.save_hyperparameters()
        self.image_encoder = RegionEncoder(feature_dim, embed_dim)
        self.text_encoder: BiLSTMTextEncoder | None = None
        self.smlstm = SelectiveMultimodalLSTM(embed_dim, hidden_dim, steps)
        if vocab_size is not None:
            self._build_text(vocab_size)
        self.init_label_constraint(label_constraint, label_settings, embed_dim)

    def _build_text(self, vocab_size: int) -> None:
        self.text_encoder = BiLSTMTextEncoder(vocab_size, self.hparams.word_dim, self.hparams.embed_dim)
        self.hparams["vocab_size"] = vocab_size  # so checkpoints rebuild the same model

    def configure_from_data(self, datamodule) -> None:
        self.size_word_embedding(datamodule, self.text_encoder, self._build_text)
        super().configure_from_data(datamodule)

    def encode_images(self, batch: dict) -> Emb:
        v = self.image_encoder(batch["images"])
        return {"regions": v, "global": l2_normalize(v.mean(1))}

    def encode_captions(self, batch: dict) -> Emb:
        if self.text_encoder is None:
            raise RuntimeError("SMLSTM needs vocab_size (or a datamodule with a vocabulary) before encoding text")
        lengths = batch["lengths"]
        t = self.text_encoder(batch["tokens"], lengths)
        mask = lengths_to_mask(lengths, t.shape[1])
        t = l2_normalize(t) * mask[..., None].to(t.dtype)  # padding stays exactly 0
        return {"words": t, "lengths": lengths, "global": l2_normalize(masked_mean(t, mask[..., None], dim=1))}

    def _run(self, img: Emb, cap: Emb, paired: bool, selected: bool = False):
        words, lengths = cap["words"], cap["lengths"]
        return self.smlstm(img["regions"], words, lengths_to_mask(lengths, words.shape[1]), img["global"],
                           cap["global"], paired=paired, return_selected=selected)

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        if use_reference():
            return self.reference_score(img, cap)
        return self._run(img, cap, paired=False)

    def reference_score(self, img: Emb, cap: Emb) -> torch.Tensor:
        """One caption at a time, cut to its real words (no padding): the slow path `make bench` and the tests
        compare the batched grid with."""
        out = []
        for c in range(cap["words"].shape[0]):
            n = int(cap["lengths"][c])
            one = {"words": cap["words"][c:c + 1, :n], "lengths": cap["lengths"][c:c + 1],
                   "global": cap["global"][c:c + 1]}
            out.append(self._run(img, one, paired=False))
        return torch.cat(out, 1)

    def matched_attended_vectors(self, img: Emb, cap: Emb) -> tuple[torch.Tensor, torch.Tensor]:
        """CASC-sm's A^I, A^T of the matched pairs: the mean over the T steps of the selected a_t and w_t."""
        _, sel = self._run(img, cap, paired=True, selected=True)
        return torch.stack([a for a, _ in sel]).mean(0)[:, 0], torch.stack([w for _, w in sel]).mean(0)[:, 0]


__all__ = ["SMLSTM"]
