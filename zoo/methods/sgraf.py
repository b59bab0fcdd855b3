"""SGRAF (Diao et al., AAAI 2021): similarity vectors, filtered (SAF) or reasoned over (SGR), scored by a sigmoid.

Images: FC + l2 over the regions (SGRAF model.py:38-68); captions: BiGRU with word dropout 0.4, the two directions
averaged, l2 (model.py:81-128). Per pair (model.py:326-371): the global alignment VSF(img_glo, cap_glo) of the
VisualSA / TextSA poolings and one local alignment per word, VSF(attended regions, word) with SCAN attention as the
official code computes it (zoo.blocks.sgraf.sgraf_attended_regions); the 1 + L vectors go through SAF or 3 SGR steps
(node 0 read out) and sigmoid(Linear) gives the score. The VSF is CCCL's Eq. (15) block (zoo.blocks.vsf, with a
bias). The paper's SGRAF is the mean of an SAF model's and an SGR model's similarity matrices:
`python -m zoo.experiments.ensemble --ckpt SAF.ckpt SGR.ckpt` (`sgraf_similarity` here for two modules).
Official code: Paranioar/SGRAF `python3.6` @ a19d1a9 (model.py, opts.py, train.py:181-188 the lr schedule).
"""
from __future__ import annotations

import torch
from torch import nn

from datamodules.errors import DataError

from ..blocks import BiGRUTextEncoder, RegionEncoder, lengths_to_mask
from ..blocks.functional import sigmoid_head, use_reference
from ..blocks.sgraf import AttentionFiltration, GraphReasoning, SelfAttentionPool, sgraf_attended_regions
from ..blocks.vsf import VectorSimilarity
from ..engine.module import Emb, RetrievalModule
from .official import ANY, check_opt, map_state, register_official, strip_module_prefix

MODULES = ("SAF", "SGR")


class SGRAF(RetrievalModule):
    """SGRAF-SAF or SGRAF-SGR (`module`).

    Args:
        vocab_size: None = taken from the datamodule at setup.
        feature_dim / embed_dim / word_dim / sim_dim / num_layers: official img_dim / embed_size / word_dim /
            sim_dim / num_layers (2048 / 1024 / 300 / 256 / 1).
        module: 'SAF' or 'SGR'; sgr_steps: SGR's steps (official sgr_step, 3).
        num_regions: VisualSA's BatchNorm1d size over the region axis (36, fixed in the official code); None =
            the datamodule's region count, taken at setup and stored in the hyper-parameters (e.g. SynthScenes
            at the ablation sizes, 18 regions).
        image_norm / text_norm: l2 on regions / words (official `not no_imgnorm` / `not no_txtnorm`).
        smooth: the softmax temperature of the SCAN attention (9, fixed in the official code, model.py:346).
        dropout: word-embedding dropout and VisualSA/TextSA dropout (0.4 in the official code).
        pair_budget: scoring splits the captions so that a block's attended vectors hold at most this many numbers
            (None: 2^20 on the CPU, where blocks that stay in cache are fastest, 2^25 on a GPU).
    """

    def __init__(self, vocab_size: int | None = None, feature_dim: int = 2048, embed_dim: int = 1024,
                 word_dim: int = 300, sim_dim: int = 256, num_layers: int = 1, module: str = "SGR",
                 sgr_steps: int = 3, num_regions: int | None = 36, image_norm: bool = True, text_norm: bool = True,
                 smooth: float = 9.0, dropout: float = 0.4, pair_budget: int | None = None, **loop_kwargs):
        super().__init__(**loop_kwargs)
        if module not in MODULES:
            raise ValueError(f"module must be one of {MODULES}, got {module!r}")
        self.save_hyperparameters()
        self.image_encoder = RegionEncoder(feature_dim, embed_dim, normalize=image_norm)
        self.text_encoder: BiGRUTextEncoder | None = None
        self.v_global: SelfAttentionPool | None = None  # VisualSA
        if num_regions is not None:
            self._build_visual_pool(num_regions)
        self.t_global = SelfAttentionPool(embed_dim, dropout)  # TextSA
        self.local_vsf = VectorSimilarity(embed_dim, sim_dim, normalize_inputs=False, bias=True)  # sim_tranloc_w
        self.global_vsf = VectorSimilarity(embed_dim, sim_dim, normalize_inputs=False, bias=True)  # sim_tranglo_w
        for vsf in (self.local_vsf, self.global_vsf):  # official init (model.py:373-378): Xavier, zero bias
            nn.init.xavier_uniform_(vsf.weight.weight)
            nn.init.zeros_(vsf.weight.bias)
        if module == "SAF":
            self.saf = AttentionFiltration(sim_dim)
        else:
            self.sgr = nn.ModuleList([GraphReasoning(sim_dim) for _ in range(sgr_steps)])
        self.eval_head = nn.Linear(sim_dim, 1)  # sim_eval_w
        nn.init.xavier_uniform_(self.eval_head.weight)
        nn.init.zeros_(self.eval_head.bias)
        if vocab_size is not None:
            self._build_text(vocab_size)

    def _build_text(self, vocab_size: int) -> None:
        hp = self.hparams
        self.text_encoder = BiGRUTextEncoder(vocab_size, hp.word_dim, hp.embed_dim, hp.num_layers,
                                             normalize=hp.text_norm, dropout=hp.dropout)
        self.hparams["vocab_size"] = vocab_size

    def _build_visual_pool(self, num_regions: int) -> None:
        if not isinstance(num_regions, int) or num_regions < 1:
            raise ValueError(f"SGRAF num_regions must be a whole number >= 1 (or None: the data's), got {num_regions!r}")
        self.v_global = SelfAttentionPool(self.hparams.embed_dim, self.hparams.dropout, num_items=num_regions)
        self.hparams["num_regions"] = num_regions  # so checkpoints rebuild the same model

    def configure_from_data(self, datamodule) -> None:
        self.size_word_embedding(datamodule, self.text_encoder, self._build_text, self.OFFICIAL_VOCAB_HINT)
        if self.v_global is None:
            n = getattr(datamodule, "num_regions", None)
            if not n:
                raise DataError(None, f"SGRAF num_regions is None (the data's region count), but "
                                f"{type(datamodule).__name__} gives none ({n!r})",
                                "set model.num_regions to the features' region count (36 for the standard layout)")
            self._build_visual_pool(int(n))

    # ---- encoders ------------------------------------------------------------------------------------
    def encode_images(self, batch: dict) -> Emb:
        if self.v_global is None:
            raise RuntimeError("SGRAF num_regions None takes the data's region count at setup: give a datamodule, "
                               "or set num_regions")
        regions = self.image_encoder(batch["images"])
        return {"regions": regions, "glo": self.v_global(regions)}

    def encode_captions(self, batch: dict) -> Emb:
        if self.text_encoder is None:
            raise RuntimeError("SGRAF needs vocab_size (or a datamodule with a vocabulary) before encoding text")
        lengths = batch["lengths"]
        words = self.text_encoder(batch["tokens"], lengths)
        mask = lengths_to_mask(lengths.to(words.device), words.shape[1])
        return {"words": words, "lengths": lengths, "glo": self.t_global(words, mask)}

    # ---- pairwise ------------------------------------------------------------------------------------
    def alignments(self, img: Emb, cap: Emb) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1 + L alignment vectors [I, C, 1 + L, P] (global first, zero past 1 + length) and their mask [C, 1 + L]."""
        words, lengths = cap["words"], cap["lengths"]
        wm = lengths_to_mask(lengths.to(words.device), words.shape[1])
        att = sgraf_attended_regions(img["regions"], words, wm, self.hparams.smooth)  # [I, C, L, d]
        loc = self.local_vsf(att, words[None].expand_as(att)) * wm[None, :, :, None].to(att.dtype)
        glo = self.global_vsf.pairwise(img["glo"], cap["glo"])  # [I, C, P]
        node_mask = torch.cat([wm.new_ones(wm.shape[0], 1), wm], 1)
        return torch.cat([glo[:, :, None], loc], 2), node_mask

    def reduce(self, sim_emb: torch.Tensor, node_mask: torch.Tensor, positions: torch.Tensor | None = None,
               n_captions: int | None = None) -> torch.Tensor:
        """SAF or SGR: [I, C, N, P] -> the similarity vector [I, C, P] (the input of sim_eval_w).

        positions / n_captions: where these captions sit in the batch (SAF's running statistics in training)."""
        if self.hparams.module == "SAF":
            return self.saf(sim_emb, node_mask, positions, n_captions)
        for step in self.sgr:
            sim_emb = step(sim_emb, node_mask)
        return sim_emb[:, :, 0]

    def score(self, img: Emb, cap: Emb) -> torch.Tensor:
        if use_reference():
            return self.reference_score(img, cap)
        # captions bucketed by exact length (no padded word is computed), each bucket chunked by the pair budget;
        # in training SAF's running statistics still take one step per caption in caption order (start_batch)
        lengths = cap["lengths"].to(cap["words"].device)
        n_cap = lengths.shape[0]
        if self.training and self.hparams.module == "SAF":
            self.saf.start_batch(n_cap)
        parts, cols = [], []
        for n in torch.unique(lengths).tolist():
            idx = torch.nonzero(lengths == n).squeeze(1)
            parts.append(self._score_chunks(img, cap, idx, int(n), n_cap))
            cols.append(idx)
        out = torch.cat(parts, 1)
        return out[:, torch.argsort(torch.cat(cols))]  # back to caption order (differentiable)

    def _score_chunks(self, img: Emb, cap: Emb, idx: torch.Tensor, n_words: int, n_cap: int) -> torch.Tensor:
        n_img, d = img["regions"].shape[0], cap["words"].shape[2]
        budget = self.hparams.pair_budget or (2 ** 25 if img["regions"].is_cuda else 2 ** 20)
        step = max(1, int(budget // max(1, n_img * n_words * d)))
        out = []
        for s in range(0, idx.shape[0], step):
            sel = idx[s:s + step]
            part = {"words": cap["words"][sel, :n_words], "lengths": cap["lengths"][sel], "glo": cap["glo"][sel]}
            sim_emb, node_mask = self.alignments(img, part)
            out.append(sigmoid_head(self.eval_head, self.reduce(sim_emb, node_mask, sel, n_cap)))  # fp32 (issue 19)
        return torch.cat(out, 1)

    def reference_score(self, img: Emb, cap: Emb) -> torch.Tensor:
        """The official loop (model.py:335-369): one caption at a time, cut to its real words (no padding)."""
        out = []
        for c in range(cap["words"].shape[0]):
            n = int(cap["lengths"][c])
            one = {"words": cap["words"][c:c + 1, :n], "lengths": cap["lengths"][c:c + 1], "glo": cap["glo"][c:c + 1]}
            sim_emb, node_mask = self.alignments(img, one)
            out.append(sigmoid_head(self.eval_head, self.reduce(sim_emb, node_mask)))
        return torch.cat(out, 1)


def sgraf_similarity(saf: SGRAF, sgr: SGRAF, img_saf: Emb, cap_saf: Emb, img_sgr: Emb, cap_sgr: Emb) -> torch.Tensor:
    """SGRAF = (S_SAF + S_SGR) / 2 (the paper's ensemble; zoo.experiments.ensemble.ensemble_metrics scores it)."""
    return 0.5 * (saf.score(img_saf, cap_saf) + sgr.score(img_sgr, cap_sgr))


# ---- official checkpoints ----------------------------------------------------------------------------------
#: the official opt settings (SGRAF opts.py:6-67) and what the zoo accepts
_SGRAF_OPT = {
    "margin": ANY, "max_violation": ANY, "img_dim": ANY, "word_dim": ANY, "embed_size": ANY, "sim_dim": ANY,
    "num_layers": ANY, "no_imgnorm": ANY, "no_txtnorm": ANY, "sgr_step": ANY,
    "bi_gru": (True,),  # the one-direction GRU variant is not in the zoo (BiGRUTextEncoder)
    "module_name": MODULES,
}


def _sim_mapping(module: str, steps: int) -> dict[str, str | None]:
    m = {"v_global_w.embedding_local.0.": "v_global.local.0.", "v_global_w.embedding_local.1.": "v_global.local.1.",
         "v_global_w.embedding_global.0.": "v_global.glob.0.", "v_global_w.embedding_global.1.": "v_global.glob.1.",
         "v_global_w.embedding_common.0.": "v_global.common.",
         "t_global_w.embedding_local.0.": "t_global.local.0.", "t_global_w.embedding_global.0.": "t_global.glob.0.",
         "t_global_w.embedding_common.0.": "t_global.common.",
         "sim_tranloc_w.": "local_vsf.weight.", "sim_tranglo_w.": "global_vsf.weight.", "sim_eval_w.": "eval_head."}
    if module == "SAF":
        m.update({"SAF_module.attn_sim_w.": "saf.attn.", "SAF_module.bn.": "saf.bn."})
    else:
        for k in range(steps):
            m.update({f"SGR_module.{k}.graph_query_w.": f"sgr.{k}.query.", f"SGR_module.{k}.graph_key_w.": f"sgr.{k}.key.",
                      f"SGR_module.{k}.sim_graph_w.": f"sgr.{k}.out."})
    return m


class _SimParts(nn.Module):
    """The similarity side of an SGRAF module under the official sim_enc's root (for map_state)."""

    def __init__(self, m: SGRAF):
        super().__init__()
        for name in ("v_global", "t_global", "local_vsf", "global_vsf", "saf", "sgr", "eval_head"):
            if hasattr(m, name):
                setattr(self, name, getattr(m, name))


def _import_sgraf(ckpt: dict, module: str) -> SGRAF:
    src = ckpt.get("_path")
    opt = check_opt(ckpt["opt"], _SGRAF_OPT, src)
    if opt["module_name"] != module:
        raise DataError(src, f"the checkpoint is an SGRAF-{opt['module_name']} model (opt.module_name), not {module}",
                        f"use the importer sgraf_{opt['module_name'].lower()}")
    if len(ckpt["model"]) != 3:
        raise DataError(src, f"'model' holds {len(ckpt['model'])} state dicts, SGRAF saves 3 (img_enc, txt_enc, "
                        "sim_enc)", "pass an SGRAF checkpoint")
    img_sd, txt_sd, sim_sd = ckpt["model"]
    vocab_size = int(opt.get("vocab_size") or strip_module_prefix(txt_sd)["embed.weight"].shape[0])
    m = SGRAF(vocab_size=vocab_size, feature_dim=int(opt["img_dim"]), embed_dim=int(opt["embed_size"]),
              word_dim=int(opt["word_dim"]), sim_dim=int(opt["sim_dim"]), num_layers=int(opt["num_layers"]),
              module=module, sgr_steps=int(opt["sgr_step"]), image_norm=not opt["no_imgnorm"],
              text_norm=not opt["no_txtnorm"], margin=float(opt["margin"]),
              hardest_negative=bool(opt["max_violation"]), lr=float(opt.get("learning_rate", 2e-4)),
              lr_decay_epochs=int(opt.get("lr_update", 30)))
    map_state(img_sd, {"fc.": "fc."}, m.image_encoder, src)
    map_state(txt_sd, {"embed.": "embed.", "cap_rnn.": "rnn."}, m.text_encoder, src)
    map_state(sim_sd, _sim_mapping(module, int(opt["sgr_step"])), _SimParts(m), src)
    return m


@register_official("sgraf_saf")
def import_sgraf_saf(ckpt: dict, vocab=None) -> SGRAF:
    return _import_sgraf(ckpt, "SAF")


@register_official("sgraf_sgr")
def import_sgraf_sgr(ckpt: dict, vocab=None) -> SGRAF:
    return _import_sgraf(ckpt, "SGR")
