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
| CASC  | (10) global attention vectors A^I, A^T | attention.global_attention_weights (+ block_/paired_global_weights) |
| CASC  | label head d -> 512 -> K (tanh)        | semantic.LabelHead (+ pair_label_logits)      |
| CASC  | (11) positively weighted BCE           | semantic.weighted_label_bce                   |
| CASC  | (13) S = beta S_loc + (1-beta) S_G     | semantic.local_similarity, semantic.fuse      |
| CASC  | (13) S_G, released (a) / printed (b)   | semantic.global_label_similarity_pairs / _labels |
| CASC  | Table I rows 1 / 3 (no attention, global cosine) | semantic.max_local_similarity / mean_pooled_cosine |
| zoo   | search first stage: l2 mean of regions / words | semantic.mean_region_vector / mean_word_vector |
| SCAN  | clipped-l2 normalisation, LSE pooling  | functional.normalize_scores, functional.aggregate |
| CCCL  | (17) ReLU-l2 normalisation             | functional.normalize_scores(how="relu_l2")   |
| CCCL  | (33) triplet alignment term            | losses.triplet_ranking_loss                   |
| VSE++ | image FC + l2 (one vector per image)   | encoders.RegionEncoder                        |
| VSE++ | GRU, state at the last word, l2        | encoders.GRULastStateEncoder                  |
| VSE++ | hinge triplet, max_violation / sum     | losses.triplet_ranking_loss                   |
| VSE∞  | (2)-(5) GPO pooling (sorted, theta)    | pooling.GPO (+ slow_gpo reference)            |
| VSE∞  | position encodings of GPO's BiGRU      | pooling.positional_encoding_1d                |
| VSE∞  | region FC + 2-layer BN-MLP residual    | encoders.RegionEncoder + encoders.BatchNormMLP |
| VSE∞  | BiGRU words (directions averaged)      | encoders.BiGRUTextEncoder(normalize=False)    |
| CCCL  | (1)-(7) context-perceived cell (CPC)   | cpc.ContextPerceivedCell                      |
| CCCL  | (8)-(10) visual embedding              | cpc.VisualContextEmbedding                    |
| CCCL  | (9) absolute position features         | cpc.box_position_tuple, cpc.BoxPositionEmbedding |
| CCCL  | (11) BERT word features (sub-word pool)| bert.BertWordEncoder, bert.pool_subwords      |
| CCCL  | (11)-(12) textual embedding            | cpc.TextContextEmbedding                      |
| CCCL  | (13)-(14) max+avg pooling, FC          | vsf.global_pool, vsf.GlobalEmbedding          |
| CCCL  | (15)-(16) vector similarity (VSF)      | vsf.VectorSimilarity                          |
| CCCL  | (17)-(20) Branch 2 cross attention+VSF | vsf.local_similarity                          |
| CCCL  | (21)-(23) visual/textual graphs        | graph.AffinityGraph, graph.edge_weights, graph.dependency_edges |
| CCCL  | (24)-(25) residual GCN                 | graph.ResidualGCN                             |
| CCCL  | (26) C-GRU, batched over pairs         | graph.pair_gru_last_state (+ slow_pair_gru_last_state) |
| CCCL  | (27) Branch 3 VSF                      | vsf.VectorSimilarity                          |
| CCCL  | (28) shared MLP scorer (sigmoid)       | vsf.SimilarityScorer                          |
| CCCL  | (29)-(31) coherence term L_c           | coherence.coherence_loss                      |
| CCCL  | (32) F = mean of branch scores         | vsf.fuse_scores                               |
| CCCL  | (33)-(34) hybrid loss                  | coherence.hybrid_loss                         |
| SGRAF | VisualSA / TextSA global pooling       | sgraf.SelfAttentionPool                       |
| SGRAF | SCAN attention as its code (x9, l2 over words) | sgraf.sgraf_attended_regions (attention.attention_weights) |
| SGRAF | local / global alignment vectors       | vsf.VectorSimilarity(normalize_inputs=False, bias=True) |
| SGRAF | SAF (filtration)                       | sgraf.AttentionFiltration                     |
| SGRAF | SGR (one graph reasoning step)         | sgraf.GraphReasoning                          |
| SCAN  | t-i / i-t attention, AVG / LSE         | attention.t2i_similarity / i2t_similarity (CASC-base's scorer) |
| CASC  | (10)-(12) label constraint, any method | semantic.label_constraint_loss (+ paired_global_vectors) |
| CASC  | (10)-(12) as a switch on a method      | methods.label_constraint.LabelConstraintMixin |
| DAN   | Sec. 3.1 BiLSTM words, directions summed | encoders.BiLSTMTextEncoder                  |
| DAN   | Sec. 3.2 memory-guided attention step  | dan.DANAttention (+ dan.masked_softmax)       |
| DAN   | Sec. 4.2 m-DAN: K steps, separate memories | dan.MDAN                                  |
| DAN   | Sec. 4.2 S = sum_k v^(k) . u^(k)       | dan.dan_similarity                            |
| sm-LSTM | Sec. 3 saliency + multimodal LSTM, per pair | smlstm.SelectiveMultimodalLSTM           |
"""
from .attention import (RegionWordScores, attend, attention_weights, cross_attention_similarity, i2t_similarity,
                        reference_scoring, region_word_scores, t2i_similarity)
from .encoders import BatchNormMLP, BiGRUTextEncoder, GRULastStateEncoder, RegionEncoder
from .functional import aggregate, l2_normalize, lengths_to_mask, normalize_scores, safe_sqrt
from .losses import triplet_ranking_loss
from .pooling import GPO, positional_encoding_1d, slow_gpo
from .semantic import mean_region_vector, mean_word_vector

__all__ = [
    "RegionWordScores", "attend", "attention_weights", "cross_attention_similarity", "reference_scoring",
    "i2t_similarity", "region_word_scores", "t2i_similarity",
    "BatchNormMLP", "BiGRUTextEncoder", "GPO", "GRULastStateEncoder", "positional_encoding_1d", "slow_gpo",
    "RegionEncoder", "aggregate", "l2_normalize", "lengths_to_mask", "normalize_scores", "safe_sqrt",
    "triplet_ranking_loss", "mean_region_vector", "mean_word_vector",
]
