"""sm-LSTM (Huang, Wang, Wang, Instance-aware Image and Sentence Matching with Selective Multimodal LSTM, CVPR 2017).

(The paper is not in /work/shared/papers: its equations are cited by section and name, not by number.)
For one image-sentence pair, T steps of a multimodal LSTM (Sec. 3.2-3.3):
  instance-aware saliency (context-modulated attention) at step t, guided by the previous hidden state h_{t-1}
  and the global context g = [global image vector; global sentence vector]:
      p_{t,i} = softmax_i( w_a . tanh(W_a a_i + U_a h_{t-1} + G_a g) )          over the regions a_i
      q_{t,j} = softmax_j( w_w . tanh(W_w w_j + U_w h_{t-1} + G_w g) )          over the real words w_j
  the selected pair a_t = sum_i p_{t,i} a_i, w_t = sum_j q_{t,j} w_j, its local similarity
      x_t = l2(a_t) * l2(w_t)                                                    (element-wise)
  accumulated by an LSTM, h_t = LSTM(x_t, h_{t-1}); the score is a two-layer perceptron on h_T.
Everything depends on the pair (h_{t-1} does), so the module runs the T steps on every pair of a block at
once; the pair-independent projections W a_i, W w_j and G g are computed once per item.
"""
from __future__ import annotations

import torch
from torch import nn

from .dan import masked_softmax
from .functional import head_fp32, l2_normalize


class SelectiveMultimodalLSTM(nn.Module):
    """The selective multimodal LSTM on encoded instances: regions [I, R, d], words [C, L, d], word_mask [C, L],
    global vectors g_img [I, d], g_txt [C, d] -> scores [I, C] of every pair."""

    def __init__(self, embed_dim: int, hidden: int = 512, steps: int = 3):
        super().__init__()
        if steps < 1 or embed_dim < 1 or hidden < 1:
            raise ValueError(f"sm-LSTM needs steps, embed_dim and hidden >= 1, got {steps}, {embed_dim}, {hidden}")
        self.steps, self.hidden = steps, hidden
        self.region_item = nn.Linear(embed_dim, hidden)  # W_a
        self.region_state = nn.Linear(hidden, hidden, bias=False)  # U_a
        self.region_context = nn.Linear(2 * embed_dim, hidden, bias=False)  # G_a
        self.region_score = nn.Linear(hidden, 1)  # w_a
        self.word_item = nn.Linear(embed_dim, hidden)  # W_w
        self.word_state = nn.Linear(hidden, hidden, bias=False)  # U_w
        self.word_context = nn.Linear(2 * embed_dim, hidden, bias=False)  # G_w
        self.word_score = nn.Linear(hidden, 1)  # w_w
        self.cell = nn.LSTMCell(embed_dim, hidden)
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, g_img: torch.Tensor,
                g_txt: torch.Tensor, region_mask: torch.Tensor | None = None, paired: bool = False,
                return_selected: bool = False):
        """Scores [I, C] of every image with every caption; paired=True: of row n with row n only, [B, 1].
        return_selected: also the per-step selected pairs [(a_t, w_t)], each [I, C, d] (CASC-sm's A^I, A^T)."""
        d = regions.shape[-1]
        n_i = regions.shape[0]
        n_c = 1 if paired else words.shape[0]
        if paired and words.shape[0] != n_i:
            raise ValueError(f"paired scoring needs as many captions as images, got {words.shape[0]} and {n_i}")
        reg_proj = self.region_item(regions)[:, None]  # W_a a_i, once per region: [I, 1, R, h]
        word_proj = self.word_item(words)[:, None] if paired else self.word_item(words)[None]  # [., ., L, h]
        w_mask = word_mask[:, None] if paired else word_mask[None]
        r_mask = None if region_mask is None else region_mask[:, None]
        g_txt_pairs = g_txt[:, None] if paired else g_txt[None]  # [I or 1, C or 1, d]
        # G [g_img; g_txt] per pair as G_img g_img + G_txt g_txt: no [I, C, 2d] tensor
        gr, gw = self.region_context.weight, self.word_context.weight
        ctx_r = (g_img @ gr[:, :d].T)[:, None] + g_txt_pairs @ gr[:, d:].T  # [I, C, h]
        ctx_w = (g_img @ gw[:, :d].T)[:, None] + g_txt_pairs @ gw[:, d:].T
        h = regions.new_zeros(n_i * n_c, self.hidden)
        c = regions.new_zeros(n_i * n_c, self.hidden)
        selected = []
        for _ in range(self.steps):
            h_pairs = h.view(n_i, n_c, -1)
            # instance-aware saliency maps, guided by h_{t-1} and the global context
            e_r = self.region_score(torch.tanh(reg_proj + (self.region_state(h_pairs) + ctx_r)[:, :, None]))
            e_w = self.word_score(torch.tanh(word_proj + (self.word_state(h_pairs) + ctx_w)[:, :, None]))
            p = masked_softmax(e_r.squeeze(-1), r_mask)  # [I, C, R]
            q = masked_softmax(e_w.squeeze(-1), w_mask)  # [I, C, L]
            a_sel = torch.einsum("icr,ird->icd", p, regions)
            w_sel = torch.einsum("icl,ild->icd", q, words) if paired else torch.einsum("icl,cld->icd", q, words)
            x = l2_normalize(a_sel) * l2_normalize(w_sel)  # local similarity of the selected pair
            h, c = self.cell(x.reshape(n_i * n_c, -1), (h, c))  # the multimodal LSTM accumulates it
            if return_selected:
                selected.append((a_sel, w_sel))
        s = head_fp32(self.readout, h).view(n_i, n_c)  # float32 under autocast
        return (s, selected) if return_selected else s
