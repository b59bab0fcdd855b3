"""DAN: Dual Attention Networks, the matching model m-DAN (Nam, Ha, Kim, CVPR 2017, Sec. 4.2). No official code.

Regions (the features as they are) and words (embedding -> BiLSTM, the two directions summed) each go through
K = 2 steps of memory-guided soft attention with a separate memory per modality (zoo.blocks.dan.MDAN); the
similarity is S = sum_{k=0..K} v^(k) . u^(k), trained with the bidirectional hinge ranking loss summed over the
batch's negatives (the shared loop's triplet loss, hardest_negative: false). Because the memories are separate,
every step vector depends on its own item only: S is the dot product of two per-item vectors, so evaluation is
one matrix product per block and zoo.search ranks by it exactly.

`memory: joint` is the other reading (r-DAN's joint memory, Sec. 4.1, in the matching model; zoo.blocks.dan): one
memory per pair m^(k) = m^(k-1) + v^(k) * u^(k) guides both attentions, S = sum_k v^(k) . u^(k) as m-DAN. Every step
depends on the pair, so scoring is pairwise (blocks of the grid, like SCAN's) and a search's first stage uses the
l2-normalised v^(0), u^(0).

CASC-DAN (CASC Table VII): `label_constraint: true` adds CASC's label loss (Eqs. 10-12) on A^I = the mean of the
attended visual vectors v^(1..K), A^T = the mean of the attended textual vectors u^(1..K) (README, interpretation
table: DAN).
"""
from __future__ import annotations

import torch


from ..blocks.dan import MDAN, dan_similarity
from ..blocks.encoders import BiLSTMTextEncoder
from ..blocks.functional import l2_normalize, lengths_to_mask
from ..engine.module import Emb, RetrievalModule
from .label_constraint import LabelConstraintMixin


MEMORIES = ("separate", "joint")


class DAN(LabelConstraintMixin, RetrievalModule):
    """m-DAN.

    Args:
        vocab_size: word vocabulary size; None = taken from the datamodule at setup.
        feature_dim: region feature width (the paper: 2048-d ResNet-152 grid cells; here bottom-up regions).
        embed_dim: joint space d of v^(k), u^(k) and the memories; word_dim: word embedding size.
        hidden_dim: size of the attention's hidden layer h_n; steps: K (2 in the paper).
        memory: 'separate' (m-DAN, the paper's matching model: a memory per modality) or 'joint' (r-DAN's one
            memory per pair, m^(k) = m^(k-1) + v^(k) * u^(k); README, interpretation table: DAN).
        label_constraint / label_settings: CASC's label constraint (CASC-DAN); see zoo.methods.label_constraint.
    """

    def __init__(self, vocab_size: int | None = None, feature_dim: int = 2048, embed_dim: int = 512,
                 word_dim: int = 512, hidden_dim: int = 512, steps: int = 2, memory: str = "separate",
                 label_constraint: bool = False, label_settings: dict | None = None, **loop_kwargs):
        loop_kwargs.setdefault("hardest_negative", False)  # DAN's ranking loss sums over the batch's negatives
        super().__init__(**loop_kwargs)
        for name, value in (("feature_dim", feature_dim), ("embed_dim", embed_dim), ("word_dim", word_dim),
                            ("hidden_dim", hidden_dim), ("steps", steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DAN {name} must be a whole number >= 1, got {value!r}")
        if memory not in MEMORIES:
            raise ValueError(f"DAN memory must be one of {MEMORIES} (m-DAN's memory per modality, or r-DAN's one "
                             f"per pair), got {memory!r}")
        self.save_hyperparameters()
        self.dan = MDAN(feature_dim, embed_dim, hidden_dim, steps)
        self.text_encoder: BiLSTMTextEncoder | None = None
        if vocab_size is not None:
            self._build_text(vocab_size)
        self.init_label_constraint(label_constraint, label_settings, embed_dim)

    def _build_text(self, vocab_size: int) -> None:
        self.text_encoder = BiLSTMTextEncoder(vocab_size, self.hparams.word_dim, self.hparams.embed_dim)
        self.hparams["vocab_size"] = vocab_size  # so checkpoints rebuild the same model

    def configure_from_data(self, datamodule) -> None:
        self.size_word_embedding(datamodule, self.text_encoder, self._build_text)
        super().configure_from_data(datamodule)

    @property
    def joint(self) -> bool:
        return self.hparams.memory == "joint"

    def encode_images(self, batch: dict) -> Emb:
        if self.joint:  # the pair-independent parts; the steps run per pair in score
            out = self.dan.image_items(batch["images"], batch.get("region_mask"))
            if batch.get("region_mask") is not None:
                out["region_mask"] = batch["region_mask"]
            return out
        steps = self.dan.encode_images(batch["images"], batch.get("region_mask"))  # [I, K+1, d]
        return {"vector": steps.flatten(1)}

    def encode_captions(self, batch: dict) -> Emb:
        if self.text_encoder is None:
            raise RuntimeError("DAN needs vocab_size (or a datamodule with a vocabulary) before encoding text")
        words = self.text_encoder(batch["tokens"], batch["lengths"])
        mask = lengths_to_mask(batch["lengths"].to(words.device), words.shape[1])
        if self.joint:
            return {**self.dan.caption_items(words, mask), "words": words, "lengths": batch["lengths"]}
        steps = self.dan.encode_captions(words, mask)
        return {"vector": steps.flatten(1)}

    def _joint(self, img: Emb, cap: Emb, paired: bool = False, return_steps: bool = False):
        words = cap["words"]
        mask = lengths_to_mask(cap["lengths"].to(words.device), words.shape[1])
        region_mask = img.get("region_mask")
        return self.dan.joint_scores(img, None if region_mask is None else region_mask.bool(), cap, words, mask,
                                     paired=paired, return_steps=return_steps)

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        if self.joint:
            return self._joint(img, cap)
        return dan_similarity(self._steps(img), self._steps(cap))

    def global_embedding(self, emb: Emb, side: str) -> torch.Tensor:
        """m-DAN: its own step vectors (the score is their dot product). Joint memory: l2(v^(0)) / l2(u^(0))."""
        if not self.joint:
            return super().global_embedding(emb, side)
        if side not in ("images", "captions"):
            raise ValueError(f"side must be 'images' or 'captions', got {side!r}")
        return l2_normalize((emb["v0"] if side == "images" else emb["u0"]).float())

    def _steps(self, emb: Emb) -> torch.Tensor:
        return emb["vector"].view(emb["vector"].shape[0], self.hparams.steps + 1, self.hparams.embed_dim)

    def matched_attended_vectors(self, img: Emb, cap: Emb) -> tuple[torch.Tensor, torch.Tensor]:
        """CASC-DAN's A^I, A^T: the mean over the K attention steps of v^(k) and u^(k) (k >= 1; v^(0), u^(0) are
        plain means, not attended). Joint memory: the same means for each matched pair."""
        if self.joint:
            _, steps = self._joint(img, cap, paired=True, return_steps=True)
            return (torch.stack([v for v, _ in steps]).mean(0)[:, 0],
                    torch.stack([u for _, u in steps]).mean(0)[:, 0])
        return self._steps(img)[:, 1:].mean(1), self._steps(cap)[:, 1:].mean(1)


__all__ = ["DAN"]
