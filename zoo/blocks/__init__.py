"""Shared building blocks: plain torch modules and functions, usable without Lightning.

Where each equation lives (search for the tag, e.g. "CASC Eq. (4)"):

| paper | equation                               | code                                          |
|-------|----------------------------------------|-----------------------------------------------|
| CASC  | (1) region FC                          | encoders.RegionEncoder                        |
| CASC  | (2) BiGRU word features                | encoders.BiGRUTextEncoder                     |
| CASC  | (3) region-word cosine s_ij            | attention.region_word_scores                  |
| CASC  | (4)/(6) attention weights, lambda      | attention.attention_weights (+ attend)        |
| CASC  | (5) S_I2T, mean over regions           | attention.i2t_similarity                      |
| CASC  | (7) S_T2I, mean over words             | attention.t2i_similarity                      |
| CASC  | (3)-(7) both directions, fast path     | fast_attention.cross_attention_similarity (via attention.cross_attention_similarity) |
| CASC  | (8)-(9) hardest-negative triplet loss  | losses.triplet_ranking_loss                   |
| SCAN  | clipped-l2 normalisation, LSE pooling  | functional.normalize_scores, functional.aggregate |
| CCCL  | (17) ReLU-l2 normalisation             | functional.normalize_scores(how="relu_l2")   |
| CCCL  | (33) triplet alignment term            | losses.triplet_ranking_loss                   |
"""
from .attention import (RegionWordScores, attend, attention_weights, cross_attention_similarity, i2t_similarity,
                        reference_scoring, region_word_scores, t2i_similarity)
from .encoders import BiGRUTextEncoder, RegionEncoder
from .functional import aggregate, l2_normalize, lengths_to_mask, normalize_scores, safe_sqrt
from .losses import triplet_ranking_loss

__all__ = [
    "RegionWordScores", "attend", "attention_weights", "cross_attention_similarity", "reference_scoring",
    "i2t_similarity", "region_word_scores", "t2i_similarity",
    "BiGRUTextEncoder", "RegionEncoder", "aggregate", "l2_normalize", "lengths_to_mask", "normalize_scores",
    "safe_sqrt", "triplet_ranking_loss",
]
