"""`zoo-search serve I --port 8000`: one HTML page and a JSON API over an index (FastAPI + uvicorn).

    GET /                                   the page: a text box, the ranked results with their scores and, for
                                            galleries with boxes, each result's region boxes shaded by the query
                                            words' attention
    GET /api/search?q=...&k=10&rerank=100   text queries of an image gallery (rerank=0: exhaustive)
    GET /api/search?image=N&k=10            image queries of a caption gallery
    GET /api/image/{id}                     the image file of item id, where --images DIR holds one ({id}.jpg/.png)

The attention shown is the T2I attention of the method's own cross attention (CASC Eq. (6) with the model's
lambda_2 and score normalisation; CCCL's attention_smooth with ReLU-l2), the mean over the query's real words, the
same weights `python -m zoo.tools.pictures attention` draws one panel per word (the page draws them in the browser
as SVG, so the server needs no plotting).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.layout import open_npy, split_paths

from ..blocks import attend
from .index import ShardedIndex

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zoo-search</title>
<style>
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
form { display: flex; gap: .5em; margin-bottom: 1em; } #q { flex: 1; font-size: 1.1em; padding: .3em; }
.hit { display: flex; gap: 1em; align-items: center; border-bottom: 1px solid #ddd; padding: .5em 0; }
.rank { font-weight: bold; width: 2em; } .score { font-family: monospace; width: 6em; } svg { background: #f4f4f4; }
#note { color: #a50; } #meta { color: #666; font-size: .9em; }
</style></head><body>
<h1>zoo-search</h1>
<div id="meta">__META__</div>
<form id="f"><input id="q" name="q" placeholder="__PLACEHOLDER__" autofocus>
<input id="k" name="k" type="number" value="10" min="1" style="width:4em">
<button id="go" type="submit">Search</button></form>
<div id="note"></div><div id="results"></div>
<script>
const SIDE = "__SIDE__";
function boxes(h) {
  if (!h.boxes) return "";
  const S = 160; let s = `<svg width="${S}" height="${S}" viewBox="0 0 1 1" preserveAspectRatio="none">`;
  if (h.image) s += `<image href="${h.image}" x="0" y="0" width="1" height="1" preserveAspectRatio="none"/>`;
  const m = Math.max(...h.weights, 1e-12);
  const order = h.weights.map((w, i) => [w, i]).sort((a, b) => a[0] - b[0]);
  for (const [w, i] of order) {
    const [x1, y1, x2, y2] = h.boxes[i], a = w / m;
    s += `<rect x="${x1}" y="${y1}" width="${x2 - x1}" height="${y2 - y1}" fill="rgba(217,26,26,${0.6 * a})" ` +
         `stroke="rgba(0,0,0,${0.15 + 0.85 * a})" stroke-width="0.005"/>`;
  }
  return s + "</svg>";
}
async function search(ev) {
  if (ev) ev.preventDefault();
  const q = document.getElementById("q").value, k = document.getElementById("k").value;
  const arg = SIDE === "images" ? "q=" + encodeURIComponent(q) : "image=" + encodeURIComponent(q);
  const r = await fetch(`/api/search?${arg}&k=${k}`);
  const data = await r.json();
  const note = document.getElementById("note"), out = document.getElementById("results");
  if (!r.ok) { note.textContent = data.detail; out.innerHTML = ""; return; }
  note.textContent = data.oov.length ? "not in the vocabulary (read as <unk>): " + data.oov.join(", ") : "";
  out.innerHTML = data.results.map(h => `<div class="hit"><span class="rank">${h.rank}</span>` +
    `<span class="score">${h.score.toFixed(4)}</span>${boxes(h)}<span>#${h.id}: ${h.caption}</span></div>`).join("");
  out.dataset.count = data.results.length;
}
document.getElementById("f").addEventListener("submit", search);
</script></body></html>
"""


class SearchPage:
    """What the page needs beyond the index: boxes of the gallery's images and where their image files are."""

    def __init__(self, index: ShardedIndex, images: str | Path | None = None):
        self.index = index
        meta = index.shards[0].meta
        self.images = Path(images) if images else None
        path = split_paths(meta["root"], meta["split"])["boxes"] if meta.get("root") else None
        self.boxes = open_npy(path) if path is not None and path.exists() and index.side == "images" else None
        hp = index.model.hparams
        self.smooth = float(hp.get("lambda_t2i", hp.get("attention_smooth", 4.0)))
        self.norm = hp.get("score_norm", "relu_l2")

    def image_file(self, i: int) -> Path | None:
        if self.images is None:
            return None
        for suffix in IMAGE_SUFFIXES:
            p = self.images / f"{i}{suffix}"
            if p.is_file():
                return p
        return None

    @torch.no_grad()
    def attention(self, query: dict, item: int) -> list[float] | None:
        """Mean over the query's real words of their attention over the item's regions (T2I), [R]."""
        shard = next(s for s in self.index.shards if s.offset <= item < s.offset + s.n)
        if "regions" not in shard.emb or "words" not in query:
            return None
        row = item - shard.offset
        regions = torch.from_numpy(np.array(shard.emb["regions"][row : row + 1])).float()
        n = int((query["lengths"] if "lengths" in query else query["n_words"])[0])
        _, alpha = attend(query["words"][:, :n].float(), regions, smooth=self.smooth, norm=self.norm)  # [1, n, R]
        if "lengths" in query and n > 2:  # the zoo's word ids hold <start>/<end>: the words are between
            alpha = alpha[:, 1 : n - 1]
        return alpha[0].mean(0).tolist()

    def search(self, q: str | None, image: int | None, k: int, rerank: int | None) -> dict:
        idx = self.index
        query, oov = idx.shards[0].encode_query(q, image)
        res = idx.query(k=k, rerank=rerank, query_emb=query)
        out = []
        for h in res.hits:
            row = {"rank": h.rank, "id": h.id, "score": h.score, "caption": h.caption, "boxes": None, "weights": None,
                   "image": f"/api/image/{h.id}" if self.image_file(h.id) else None}
            if self.boxes is not None:
                w = self.attention(query, h.id)
                if w is not None:
                    row["boxes"], row["weights"] = np.asarray(self.boxes[h.id]).tolist(), w
            out.append(row)
        return {"query": q if q is not None else image, "oov": oov, "candidates": res.candidates, "ms": res.ms,
                "results": out}


def create_app(index: ShardedIndex, images: str | Path | None = None):
    try:
        from fastapi import FastAPI, HTTPException, Query
        from fastapi.responses import FileResponse, HTMLResponse
    except ImportError as e:
        raise ImportError("the page needs FastAPI and uvicorn: pip install 'itm-zoo[search]'") from e
    page = SearchPage(index, images)
    app = FastAPI(title="zoo-search")
    meta = index.shards[0].meta
    html = (PAGE.replace("__SIDE__", index.side)
            .replace("__PLACEHOLDER__", "a caption, e.g. a red dog left of a car" if index.side == "images"
                     else "an image id of the split")
            .replace("__META__", f"{meta['method'].rsplit('.', 1)[-1]} · {index.n} {index.side} of "
                     f"{Path(meta['root']).name}/{meta['split']}"))

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return html

    @app.get("/api/search")
    def search(q: str | None = None, image: int | None = None, k: int = Query(10, ge=1, le=1000),
               rerank: int = Query(100, ge=0)) -> dict:
        try:
            return page.search(q, image, k, rerank or None)
        except (ValueError, IndexError) as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    @app.get("/api/image/{item}")
    def image_file(item: int):
        p = page.image_file(item)
        if p is None:
            raise HTTPException(status_code=404, detail=f"no image file for item {item} (--images DIR/{item}.jpg)")
        return FileResponse(p)

    return app


def serve(folders: list[str], port: int = 8000, host: str = "127.0.0.1", images: str | None = None,
          ckpt: str | None = None) -> None:
    import uvicorn

    app = create_app(ShardedIndex.open(folders, ckpt=ckpt), images)
    uvicorn.run(app, host=host, port=port, log_level="info")
