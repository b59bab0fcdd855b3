"""CASC-base: CASC's local-alignment model (Xu et al., TNNLS 2020, Sec. III-A/B; Table I row 2).

Regions -> FC + l2 (Eq. 1); words -> BiGRU + l2 (Eq. 2); similarity = average of the I2T (lambda_1 = 9)
and T2I (lambda_2 = 4) cross-attention scores (Eqs. 3-7); hardest-negative triplet loss (Eqs. 8-9).
"""
from __future__ import annotations

import torch


from ..blocks import BiGRUTextEncoder, RegionEncoder, cross_attention_similarity
from ..blocks.semantic import paired_global_vectors
from ..engine.module import Emb, RetrievalModule
from .label_constraint import LabelConstraintMixin


class CASCBase(LabelConstraintMixin, RetrievalModule):
    """CASC-base. `direction` selects 'both' (CASC-base), 'i2t' or 't2i' (the single-branch variants).

    Args:
        vocab_size: size of the word vocabulary; None = taken from the datamodule at setup.
        feature_dim / embed_dim / word_dim: 2048 -> d (1024 in the paper), 300-d word embeddings.
        lambda_i2t / lambda_t2i: softmax smoothing lambda_1 / lambda_2.
        score_norm: normalisation of raw region-word scores before the softmax (SCAN's 'clipped_l2').
        aggregation: 'mean' (CASC) or 'lse' (SCAN's LogSumExp, temperature lse_temperature).
        aggregation_i2t / aggregation_t2i: per-direction override of `aggregation` (None = aggregation); the
            authors' released code pools I2T with LogSumExp and T2I with the mean.
        label_constraint: add CASC's label constraint (Eqs. 10-12) to training, e.g. CASC-SCAN = a SCAN preset with
            it on; A^I / A^T come from both attention directions (lambda_t2i / lambda_i2t) whatever `direction`
            scores. label_settings: its options (zoo.methods.label_constraint.LABEL_DEFAULTS; CASC's released ones).
    """

    def __init__(self, vocab_size: int | None = None, feature_dim: int = 2048, embed_dim: int = 1024,
                 word_dim: int = 300, direction: str = "both", lambda_i2t: float = 9.0, lambda_t2i: float = 4.0,
                 score_norm: str = "clipped_l2", aggregation: str = "mean", lse_temperature: float = 6.0,
                 aggregation_i2t: str | None = None, aggregation_t2i: str | None = None,
                 label_constraint: bool = False, label_settings: dict | None = None, **loop_kwargs):
        super().__init__(**loop_kwargs)
        if direction not in ("both", "i2t", "t2i"):
            raise ValueError(f"direction must be 'both', 'i2t' or 't2i', got {direction!r}")
        self.save_hyperparameters()
        self.image_encoder = RegionEncoder(feature_dim, embed_dim)
        self.text_encoder: BiGRUTextEncoder | None = None
        if vocab_size is not None:
            self._build_text(vocab_size)
        self.init_label_constraint(label_constraint, label_settings, embed_dim)

    def _build_text(self, vocab_size: int) -> None:
        hp = self.hparams
        self.text_encoder = BiGRUTextEncoder(vocab_size, hp.word_dim, hp.embed_dim)
        self.hparams["vocab_size"] = vocab_size  # so checkpoints rebuild the same model

    def configure_from_data(self, datamodule) -> None:
        self.size_word_embedding(datamodule, self.text_encoder, self._build_text)
        super().configure_from_data(datamodule)  # the label constraint's dictionary (a no-op when it is off)

    def encode_images(self, batch: dict) -> Emb:
        return {"regions": self.image_encoder(batch["images"])}

    def encode_captions(self, batch: dict) -> Emb:
        if self.text_encoder is None:
            raise RuntimeError("CASCBase needs vocab_size (or a datamodule with a vocabulary) before encoding text")
        return {"words": self.text_encoder(batch["tokens"], batch["lengths"]), "lengths": batch["lengths"]}

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        # fast path by default; `with zoo.blocks.reference_scoring():` runs the slow reference (same numbers)
        hp = self.hparams
        s = cross_attention_similarity(img["regions"], cap["words"], cap["lengths"], i2t=hp.direction != "t2i",
                                       t2i=hp.direction != "i2t", lambda_i2t=hp.lambda_i2t,
                                       lambda_t2i=hp.lambda_t2i, norm=hp.score_norm, agg=hp.aggregation,
                                       agg_i2t=hp.get("aggregation_i2t"), agg_t2i=hp.get("aggregation_t2i"),
                                       lse_temperature=hp.lse_temperature)
        if hp.direction == "both":
            return 0.5 * (s["i2t"] + s["t2i"])
        return s[hp.direction]

    def matched_attended_vectors(self, img: Emb, cap: Emb) -> tuple[torch.Tensor, torch.Tensor]:
        """CASC Eq. (10) of the matched pairs, for the label constraint: A^I, A^T ([B, d] each)."""
        hp = self.hparams
        return paired_global_vectors(img["regions"], cap["words"], cap["lengths"], smooth_i2t=hp.lambda_i2t,
                                     smooth_t2i=hp.lambda_t2i, norm=hp.score_norm)
