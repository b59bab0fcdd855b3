"""The CCCL network as a plain torch module (no Lightning): embeddings, three branches, scorer.

Embedding dicts (one row per image / caption) hold everything pair-independent, computed once per item:
  image:   regions V [I, R, d]; global v^S [I, d]; Branch 3: nodes V^ [I, R, d] (GCN output) and, with the
           C-GRU, first_gi [I, 3d] (GRU^T input projection of v^S); without the C-GRU, relation v^R [I, d].
  caption: words T [C, L, d] (word positions 1..n, no <start>/<end>); n_words [C]; global t^S [C, d]; nodes T^,
           first_gi [C, 3d] (GRU^V projection of t^S) / relation t^R.
The GRU input projections of the nodes ([.., 3d] per node) are not stored: `score` forms them once per block
(images) and per chunk of captions (under 1 % of the pair GRUs' cost), which keeps a COCO-5K gallery's caption
embeddings at 2d floats per word instead of 5d.
The caption length key is `n_words`, not `lengths`: zoo.engine.evaluation would otherwise sort and trim the caption
dict by guessing which dims are word positions, which is ambiguous when d (or 3d) equals the caption length;
`CCCLNet.score` sorts and trims its own blocks instead.
"""
from __future__ import annotations

import torch
from torch import nn

from datamodules.hub import resolve_pretrained

from ...blocks import BiGRUTextEncoder, attend, lengths_to_mask
from ...blocks.bert import BertWordEncoder
from ...blocks.functional import use_reference
from ...blocks.cpc import TextContextEmbedding, VisualContextEmbedding
from ...blocks.graph import (ContextGRU, ResidualGCN, dependency_edges, full_edges, gru_input_projection,
                             pair_gru_last_state, slow_pair_gru_last_state)
from ...blocks.vsf import GlobalEmbedding, SimilarityScorer, VectorSimilarity, fuse_scores, local_similarity

Emb = dict[str, torch.Tensor]
BRANCHES = ("global", "local", "relational")


class CCCLNet(nn.Module):
    def __init__(self, *, feature_dim: int = 2048, embed_dim: int = 1024, sim_dim: int = 256,
                 text_encoder: str = "bert", bert_model: str = "bert-base-uncased", bert_finetune: bool = True,
                 subword_pooling: str = "mean", vocab_size: int | None = None, word_dim: int = 300,
                 use_visual_cpc: bool = True, use_text_cpc: bool = True, use_box_position: bool = True,
                 position_tuple: str = "corners_area_aspect", use_global_branch: bool = True,
                 use_local_branch: bool = True, use_relational_branch: bool = True, use_vsf: bool = True,
                 use_avg_pool: bool = True, use_max_pool: bool = True, use_dependency_graph: bool = True,
                 use_context_gru: bool = True, gcn_layers: int = 1, edge_norm: str = "softmax", scorer: str = "mlp",
                 attention_smooth: float = 9.0, pair_budget: int = 2 ** 26, cpc_gain: str = "learned",
                 text_fc_init: str = "xavier", bigru_l2: bool = True, position_fusion: str = "product"):
        super().__init__()
        if sim_dim < 1:
            raise ValueError(f"sim_dim (P, the VSF width) must be at least 1, got {sim_dim}")
        if attention_smooth < 0:
            raise ValueError(f"attention_smooth (Eq. 17's softmax inverse temperature) must be >= 0, got "
                             f"{attention_smooth}")
        if scorer == "linear" and not use_vsf:
            raise ValueError("scorer: linear (w/o MLP) has nothing to score with use_vsf: false (the cosine is the "
                             "branch score): drop one of the two switches")
        if position_fusion != "product" and not use_box_position:
            raise ValueError(f"position_fusion: {position_fusion} fuses box positions, but use_box_position is false "
                             "(w/o POS): drop one of the two switches")
        if text_encoder not in ("bert", "bigru"):
            raise ValueError(f"text_encoder must be 'bert' or 'bigru', got {text_encoder!r}")
        if scorer not in ("mlp", "linear"):
            raise ValueError(f"scorer must be 'mlp' (Eq. 28) or 'linear' (w/o MLP), got {scorer!r}")
        if not (use_avg_pool or use_max_pool):
            raise ValueError("Branch 1 needs at least one of use_avg_pool / use_max_pool")
        self.branches = tuple(b for b, on in zip(BRANCHES, (use_global_branch, use_local_branch,
                                                             use_relational_branch)) if on)
        if not self.branches:
            raise ValueError("CCCL needs at least one branch (use_global_branch / use_local_branch / "
                             "use_relational_branch)")
        d = embed_dim
        self.d, self.text_encoder_kind, self.word_dim = d, text_encoder, word_dim
        self.use_dependency_graph, self.use_context_gru = use_dependency_graph, use_context_gru
        self.attention_smooth, self.pair_budget = attention_smooth, pair_budget
        self.bigru_l2 = bigru_l2
        self.visual = VisualContextEmbedding(feature_dim, d, use_box_position, use_visual_cpc, position_tuple,
                                             cpc_gain=cpc_gain, position_fusion=position_fusion)
        self.bert: BertWordEncoder | None = None
        self.bigru: BiGRUTextEncoder | None = None
        if text_encoder == "bert":
            self.bert = BertWordEncoder(resolve_pretrained(bert_model), bert_finetune, subword_pooling)
            word_width = self.bert.width
        else:
            word_width = d  # the BiGRU's width (d_E); built once the vocabulary size is known
        self.text = TextContextEmbedding(word_width, d, use_text_cpc, cpc_gain=cpc_gain, fc_init=text_fc_init)
        pooling = "max+mean" if use_avg_pool and use_max_pool else ("max" if use_max_pool else "mean")
        rel = "relational" in self.branches
        if "global" in self.branches or (rel and use_context_gru):
            self.image_global = GlobalEmbedding(d, pooling)  # Eqs. (13)-(14)
            self.text_global = GlobalEmbedding(d, pooling)
        self.sims = nn.ModuleDict()
        if "global" in self.branches:
            self.sims["global"] = VectorSimilarity(d, sim_dim, use_vsf)  # Eq. (16)
        if "local" in self.branches:
            self.sims["v2t"] = VectorSimilarity(d, sim_dim, use_vsf)  # Eq. (18)
            self.sims["t2v"] = VectorSimilarity(d, sim_dim, use_vsf)  # Eq. (19)
        if rel:
            self.image_gcn = ResidualGCN(d, gcn_layers, edge_norm)  # Eqs. (21), (24)-(25)
            self.text_gcn = ResidualGCN(d, gcn_layers, edge_norm)  # Eqs. (22)-(25)
            self.gru = ContextGRU(d)  # Eq. (26)
            self.sims["relational"] = VectorSimilarity(d, sim_dim, use_vsf)  # Eq. (27)
        self.scorer = SimilarityScorer(sim_dim, self.branches, scorer if use_vsf else "identity")  # Eq. (28)
        if text_encoder == "bigru" and vocab_size is not None:
            # last, where configure_from_data appends it when the size comes from the data: the parameters keep
            # one order either way, so a fit resumed from a checkpoint (whose hparams carry vocab_size) gets its
            # optimizer state back parameter by parameter (built in place, Adam's moments met the wrong tensors)
            self.build_bigru(vocab_size)

    def build_bigru(self, vocab_size: int) -> None:
        """"w/o BERT": CASC's BiGRU word encoder (300-d embeddings, two directions averaged), width d, l2-normalised
        per word as CASC's and SGRAF's (bigru_l2=False: raw states, norm ~0.4 at the start against regions at ~6)."""
        self.bigru = BiGRUTextEncoder(vocab_size, self.word_dim, self.d, normalize=self.bigru_l2)

    # ---- per item ---------------------------------------------------------------------------------
    def encode_images(self, features: torch.Tensor, boxes: torch.Tensor | None) -> Emb:
        v = self.visual(features, boxes)  # Eqs. (8)-(10)
        out = {"regions": v}
        if hasattr(self, "image_global"):
            out["global"] = self.image_global(v)
        if "relational" in self.branches:
            nodes = self.image_gcn(v, full_edges(torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)))
            out["nodes"] = nodes
            if self.use_context_gru:
                out["first_gi"] = gru_input_projection(self.gru.text_gru, out["global"])
            else:
                gi = gru_input_projection(self.gru.image_gru, nodes)
                out["relation"] = pair_gru_last_state(self.gru.image_gru, None, gi)[0]  # "w/o C-GRU"
        return out

    def word_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """E [C, L', d_E] of word positions 1..n (no <start>/<end>) and n_words [C]."""
        tokens, lengths = batch["tokens"], batch["lengths"]
        n_words = (lengths - 2).clamp_min(0)
        width = max(tokens.shape[1] - 2, 0)
        if self.bert is not None:
            for k in ("subword_ids", "subword_mask", "subword_to_word"):
                if k not in batch:
                    raise ValueError(f"CCCL's BERT text encoder needs the batch key {k!r}: set data.subword_tokenizer "
                                     "to the same model folder/name as model.bert_model (or model.text_encoder: bigru)")
            e = self.bert(batch["subword_ids"], batch["subword_mask"], batch["subword_to_word"], width, n_words)
        else:
            if self.bigru is None:
                raise RuntimeError("CCCL with text_encoder='bigru' needs vocab_size (or a datamodule) before encoding")
            e = self.bigru(tokens, lengths)[:, 1 : 1 + width]
        return e, n_words

    def encode_captions(self, batch: dict) -> Emb:
        e, n_words = self.word_features(batch)
        mask = lengths_to_mask(n_words, e.shape[1])
        t = self.text(e, mask)  # Eqs. (11)-(12)
        out = {"words": t, "n_words": n_words}
        if hasattr(self, "text_global"):
            out["global"] = self.text_global(t, mask)
        if "relational" in self.branches:
            if self.use_dependency_graph:
                if "adjacency" not in batch:
                    raise ValueError("CCCL's textual graph needs dependency arcs: set data.with_graphs: true "
                                     "(or model.use_dependency_graph: false for a fully connected text graph)")
                adj = batch["adjacency"][:, 1 : 1 + e.shape[1], 1 : 1 + e.shape[1]]  # drop <start>/<end>
                edges = dependency_edges(adj, mask)  # Eq. (23)
            else:
                edges = full_edges(mask)  # "w/o S-NLP"
            nodes = self.text_gcn(t, edges, mask)
            out["nodes"] = nodes
            if self.use_context_gru:
                out["first_gi"] = gru_input_projection(self.gru.image_gru, out["global"])
            else:
                gi = gru_input_projection(self.gru.text_gru, nodes)
                out["relation"] = pair_gru_last_state(self.gru.text_gru, None, gi, n_words)[0]
        return out

    # ---- per pair ---------------------------------------------------------------------------------
    def branch_sims(self, img: Emb, cap: Emb) -> dict[str, torch.Tensor]:
        """Similarity vectors [I, C, P] of every active branch for one block of pairs (no chunking)."""
        out = {}
        if "global" in self.branches:
            out["global"] = self.sims["global"].pairwise(img["global"], cap["global"])  # Eq. (16)
        if "local" in self.branches:
            out["local"] = local_similarity(img["regions"], cap["words"], cap["n_words"], self.sims["v2t"],
                                            self.sims["t2v"], self.attention_smooth)  # Eqs. (17)-(20)
        if "relational" in self.branches:
            if self.use_context_gru:  # Eq. (26), batched over the block's pairs
                img_gi = img.get("nodes_gi")  # set by `score` once per chunk; else formed here
                if img_gi is None:
                    img_gi = gru_input_projection(self.gru.image_gru, img["nodes"])
                cap_gi = cap.get("nodes_gi")
                if cap_gi is None:
                    cap_gi = gru_input_projection(self.gru.text_gru, cap["nodes"])
                v_r = pair_gru_last_state(self.gru.image_gru, cap["first_gi"], img_gi).transpose(0, 1)
                t_r = pair_gru_last_state(self.gru.text_gru, img["first_gi"], cap_gi, cap["n_words"])
                out["relational"] = self.sims["relational"](v_r, t_r)  # Eq. (27)
            else:
                out["relational"] = self.sims["relational"].pairwise(img["relation"], cap["relation"])
        return out

    def branch_scores(self, img: Emb, cap: Emb) -> dict[str, torch.Tensor]:
        """Scalar scores S^S, S^O, S^R [I, C] (Eq. 28) for one block of pairs (no chunking); the per-pair loop
        (slow_branch_scores) inside `zoo.blocks.reference_scoring()`."""
        if use_reference():
            return self.slow_branch_scores(img, cap)
        return {b: self.scorer(s, b) for b, s in self.branch_sims(img, cap).items()}

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        """F(I, Z) [I, C] (Eq. 32) for any block: captions sorted by length and cut into chunks trimmed to their
        own longest caption; images cut so that no chunk holds more than `pair_budget` floats of per-pair
        intermediates (attended vectors, GRU states)."""
        n_img, n_cap = img["regions"].shape[0], cap["words"].shape[0]
        order = torch.argsort(cap["n_words"], descending=True)
        out = torch.empty(n_img, n_cap, dtype=torch.float32, device=img["regions"].device)
        regions = img["regions"].shape[1]
        if "relational" in self.branches and self.use_context_gru:  # once per block, not per chunk of pairs
            img = {**img, "nodes_gi": gru_input_projection(self.gru.image_gru, img["nodes"])}
        cc = min(n_cap, 128)
        for a in range(0, n_cap, cc):
            idx = order[a : a + cc]
            chunk = {k: v[idx] for k, v in cap.items()}
            width = max(int(chunk["n_words"].max()), 1)
            chunk = {k: (v[:, :width] if v.dim() >= 3 else v) for k, v in chunk.items()}
            if "relational" in self.branches and self.use_context_gru:  # once per caption chunk
                chunk["nodes_gi"] = gru_input_projection(self.gru.text_gru, chunk["nodes"])
            per_pair = (regions + width + 2) * self.d
            ic = max(1, min(n_img, self.pair_budget // max(1, per_pair * len(idx))))
            for i in range(0, n_img, ic):
                ib = {k: v[i : i + ic] for k, v in img.items()}
                out[i : i + ic, idx] = fuse_scores(self.branch_scores(ib, chunk)).float()
        return out

    # ---- the slow reference -----------------------------------------------------------------------
    def slow_branch_scores(self, img: Emb, cap: Emb) -> dict[str, torch.Tensor]:
        """Branch scores [I, C] by a Python loop over pairs, each branch written out per pair with nn.GRU.

        The obviously-correct reference of `branch_scores` (tested equal, values and gradients); what
        `zoo.blocks.reference_scoring()` switches evaluation, training and `make bench`'s reference column to.
        """
        n_img, n_cap = img["regions"].shape[0], cap["words"].shape[0]
        if n_img == 0 or n_cap == 0:
            return {b: img["regions"].new_zeros(n_img, n_cap) for b in self.branches}
        rows: dict[str, list[list[torch.Tensor]]] = {b: [[] for _ in range(n_img)] for b in self.branches}
        for i in range(n_img):
            v = img["regions"][i]
            for c in range(n_cap):
                m = int(cap["n_words"][c])
                t = cap["words"][c, :m]
                if "global" in self.branches:
                    s = self.sims["global"](img["global"][i], cap["global"][c])
                    rows["global"][i].append(self.scorer(s, "global"))
                if "local" in self.branches:
                    u_t, _ = attend(v[None], t[None], smooth=self.attention_smooth, norm="relu_l2")
                    s1 = self.sims["v2t"](v, u_t[0]).mean(0)
                    u_v, _ = attend(t[None], v[None], smooth=self.attention_smooth, norm="relu_l2")
                    s2 = self.sims["t2v"](t, u_v[0]).mean(0)
                    s = s1 + s2 if self.sims["v2t"].use_vsf else 0.5 * (s1 + s2)
                    rows["local"][i].append(self.scorer(s, "local"))
                if "relational" in self.branches:
                    ctx = self.use_context_gru
                    v_r = slow_pair_gru_last_state(self.gru.image_gru, cap["global"][c] if ctx else None,
                                                   img["nodes"][i], img["nodes"].shape[1])
                    t_r = slow_pair_gru_last_state(self.gru.text_gru, img["global"][i] if ctx else None,
                                                   cap["nodes"][c], m)
                    rows["relational"][i].append(self.scorer(self.sims["relational"](v_r, t_r), "relational"))
        return {b: torch.stack([torch.stack(r) for r in per_img]) for b, per_img in rows.items()}

    @torch.no_grad()
    def slow_score(self, img: Emb, cap: Emb) -> torch.Tensor:
        """F for every pair by the per-pair loop (slow_branch_scores), float64 [I, C] (tests)."""
        return fuse_scores(self.slow_branch_scores(img, cap)).double()
