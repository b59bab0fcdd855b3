"""A search index over one gallery of a split, built once with a trained checkpoint, and two-stage queries on it.

    idx = build_index("runs/casc_base_synth/checkpoints/best.ckpt", ".cache/synthscenes", "test", "images", "I")
    hits = Index("I").query(text="a red dog left of a car", k=5, rerank=100)

The folder holds
- emb_<key>.npy: the method's per-item embeddings (encode_images / encode_captions output, one row per item;
  floating tensors as float16, integer ones as int64), memory-mapped, so a gallery larger than RAM works;
  caption tensors are zero-padded to the gallery's longest caption (their "lengths"/"n_words" say how long);
- global.npy: one float32 unit vector per item (the method's `global_embedding`, RetrievalModule) and
  index.faiss, a FAISS inner-product index over them (exact `flat`, or `hnsw` as an approximate option);
- meta.json: method, checkpoint path and sha256, vocabulary, root, split, side, item ids and captions, per-key
  shapes and dtypes, and `complete` (False while a build is under way); progress.json: chunks written so far.

A query scores its own side with the checkpoint (the text tokenised with the checkpoint's vocabulary, words it does
not know reported), takes the top `rerank` items by the global vector (stage 1) and scores those exactly with the
method's `score` (stage 2); rerank=None scores the whole gallery with `score` (the exhaustive reference). Stage 2
visits its candidates in id order and in the same blocks as the reference, so with rerank >= the gallery size
both give the same scores bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from datamodules import PrecompDataModule
from datamodules.datasets import collate
from datamodules.errors import DataError
from datamodules.layout import open_npy, split_paths
from datamodules.text import Vocabulary, tokenize

from ..engine.checkpoints import check_checkpoint, load_model
from ..engine.evaluation import trim_padding
from ..engine.module import DATA_OPTIONS, RetrievalModule
from ..engine.progress import track

FORMAT = 1
SIDES = ("images", "captions")
ANN = ("flat", "ivf", "hnsw")
IVF_NPROBE = 32  # inverted lists an IVF query visits (of about sqrt(n))
FIRST_STAGE = "_first_stage"  # a query's stage-1 vector from another checkpoint (build_index(first_stage=C2))
SCORE_BLOCK = 512  # gallery items per `score` call (stage 2 and the exhaustive reference alike)
REBUILD = "delete the folder and build it again (`zoo-search build ...`)"


def _faiss():
    try:
        import faiss
    except ImportError as e:  # the optional extra
        raise ImportError("zoo.search needs faiss: pip install 'itm-zoo[search]' (faiss-cpu from PyPI)") from e
    return faiss


def make_ann(d: int, ann: str, n: int, sample: np.ndarray | None = None, hnsw_m: int = 32):
    """The first-stage FAISS index over n unit vectors: exact inner product (`flat`), or approximate: `ivf`
    (IVF-Flat, about sqrt(n) lists, k-means trained on `sample`, a random subset of the gallery's vectors) or
    `hnsw` (HNSW-Flat, M = hnsw_m links, no training)."""
    faiss = _faiss()
    if ann == "flat":
        return faiss.IndexFlatIP(d)
    if ann == "hnsw":
        return faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    if ann != "ivf":
        raise ValueError(f"ann must be one of {ANN}, got {ann!r}")
    nlist = max(1, min(int(np.sqrt(n)), (sample.shape[0] if sample is not None else n) // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = min(IVF_NPROBE, nlist)
    return index


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def vocabulary_digest(words: list[str] | None) -> str | None:
    return None if words is None else hashlib.sha256("\n".join(words).encode()).hexdigest()


# ---- data: the gallery's split and a query's own item -------------------------------------------------------------
def gallery_datamodule(model: RetrievalModule, root: str | Path, split: str,
                       parser: str = "spacy") -> PrecompDataModule:
    """The split served with what the method reads (boxes, graphs, sub-words) and the checkpoint's own vocabulary."""
    shape = open_npy(split_paths(root, split)["ims"]).shape
    hp = model.hparams
    opts = {DATA_OPTIONS[k]: True for k in model.required_inputs if k in ("boxes", "pos", "graphs")}
    sub = hp.get("bert_model") if "subwords" in model.required_inputs else None
    dm = PrecompDataModule(root, test_split=split, num_workers=0, num_regions=shape[1], feature_dim=shape[2],
                           subword_tokenizer=sub, parser=parser, caps_per_image=model.caps_per_image, **opts)
    if model.vocab_words is not None:
        dm.use_vocabulary(Vocabulary.from_words(model.vocab_words))
    if dm.needs_parses:  # graphs / POS of this split (the vocabulary comes from the checkpoint: no prepare_data)
        from datamodules.prepare import ensure_parsed

        ensure_parsed(root, dm.cache_dir, split, parser, progress=False)
    return dm


def _to_torch(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in arrays.items():
        t = torch.from_numpy(np.array(v))  # a copy: memory-mapped rows are read-only
        out[k] = (t.float() if t.is_floating_point() else t).to(device)
    return out


# ---- building -------------------------------------------------------------------------------------------------------
@dataclass
class BuildArgs:
    checkpoint: str
    checkpoint_sha256: str
    root: str
    split: str
    side: str
    chunk: int
    ann: str
    shard: list[int]
    first_stage_sha256: str | None

    def same_build(self, meta: dict) -> bool:
        return all(meta.get(k) == v for k, v in asdict(self).items() if k not in ("checkpoint", "root"))


def _encode(model: RetrievalModule, batch: dict, side: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        emb = model.encode_images(batch) if side == "images" else model.encode_captions(batch)
        return {k: v.detach() for k, v in emb.items()}


def _store_dtype(t: torch.Tensor) -> np.dtype:
    if t.dtype == torch.bool:
        return np.dtype(np.bool_)
    return np.dtype(np.float16) if t.is_floating_point() else np.dtype(np.int64)


def _pad_to(a: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    if a.shape[1:] == shape:
        return a
    if any(s > t for s, t in zip(a.shape[1:], shape)) or a.ndim - 1 != len(shape):
        raise RuntimeError(f"{where}: an item's embedding {a.shape[1:]} exceeds the gallery's probe shape {shape}")
    out = np.zeros((a.shape[0], *shape), dtype=a.dtype)
    out[(slice(None), *[slice(0, s) for s in a.shape[1:]])] = a
    return out


class IndexWriter:
    """Writes an index folder chunk by chunk (resumable): `open`, then `write(start, emb, global)` per chunk, `finish`.

    Used by build_index (a checkpoint over a split) and by the scale benchmark (random embeddings)."""

    def __init__(self, out: str | Path, meta: dict, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                 global_dim: int,
                 n_chunks: int, resume: bool):
        self.out = Path(out)
        self.meta = meta
        n = meta["n_items"]
        mode = "r+" if resume else "w+"
        self.arrays = {k: np.lib.format.open_memmap(self.out / f"emb_{k}.npy", mode=mode, dtype=dt, shape=(n, *s))
                       for k, (s, dt) in shapes.items()}
        self.glob = np.lib.format.open_memmap(self.out / "global.npy", mode=mode, dtype=np.float32,
                                              shape=(n, global_dim))
        self.n_chunks = n_chunks

    @classmethod
    def create(cls, out: str | Path, meta: dict, shapes: dict, global_dim: int, n_chunks: int) -> "IndexWriter":
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {**meta, "format": FORMAT, "complete": False, "global_dim": global_dim, "n_chunks": n_chunks,
                "keys": {k: {"shape": list(s), "dtype": np.dtype(dt).name} for k, (s, dt) in shapes.items()}}
        _write_json(out / "meta.json", meta)
        _write_json(out / "progress.json", {"chunks_done": 0})
        return cls(out, meta, shapes, global_dim, n_chunks, resume=False)

    @classmethod
    def reopen(cls, out: str | Path, meta: dict) -> "IndexWriter":
        shapes = {k: (tuple(v["shape"]), np.dtype(v["dtype"])) for k, v in meta["keys"].items()}
        return cls(out, meta, shapes, meta["global_dim"], meta["n_chunks"], resume=True)

    def chunks_done(self) -> int:
        return int(_read_json(self.out / "progress.json", self.out).get("chunks_done", 0))

    def write(self, chunk: int, start: int, emb: dict[str, np.ndarray], glob: np.ndarray) -> None:
        stop = start + glob.shape[0]
        for k, a in self.arrays.items():
            a[start:stop] = _pad_to(emb[k], a.shape[1:], str(self.out / f"emb_{k}.npy"))
        self.glob[start:stop] = glob
        for a in (*self.arrays.values(), self.glob):
            a.flush()
        _write_json(self.out / "progress.json", {"chunks_done": chunk + 1})

    def finish(self, ann: str = "flat", hnsw_m: int = 32) -> None:
        faiss = _faiss()
        n, d = self.glob.shape
        sample = None
        if ann == "ivf":
            rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, 50_000), replace=False))
            sample = np.asarray(self.glob[rows], dtype=np.float32)
        index = make_ann(d, ann, n, sample, hnsw_m)
        for a in range(0, self.glob.shape[0], 65536):
            index.add(np.ascontiguousarray(self.glob[a : a + 65536], dtype=np.float32))
        faiss.write_index(index, str(self.out / "index.faiss"))
        self.meta["complete"] = True
        _write_json(self.out / "meta.json", self.meta)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)  # a reader never sees half a file


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(folder, f"not a search index ({path.name} is missing)",
                        "build one with `zoo-search build --ckpt C --root R --split test --side images --out DIR`")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"the index is corrupt ({path.name} does not parse: {e})", REBUILD)


def build_index(checkpoint: str | Path, root: str | Path, split: str = "test", side: str = "images",
                out: str | Path = "index", chunk: int = 256, ann: str = "flat", progress: bool = True,
                stop_after: int | None = None, parser: str = "spacy", shard: tuple[int, int] = (0, 1),
                first_stage: str | Path | None = None) -> Path:
    """Encodes the split's images (side="images") or captions (side="captions") with the checkpoint, `chunk` images
    at a time, into the folder `out`. Run again after an interruption, it resumes from the last chunk written.
    first_stage: another checkpoint whose global_embedding gives the stage-1 vectors (e.g. a global model in front
    of a cross-attention re-ranker); the query is then encoded by both. shard (i, n): only the i-th of n contiguous
    parts of the split's images (or of their captions); a query over
    the n folders (ShardedIndex) merges their candidates. stop_after: stop after this many chunks as an interruption
    would (tests)."""
    i_shard, n_shards = shard
    if not (n_shards >= 1 and 0 <= i_shard < n_shards):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i_shard}/{n_shards}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if ann not in ANN:
        raise ValueError(f"ann must be one of {ANN}, got {ann!r}")
    check_checkpoint(str(checkpoint))
    if first_stage is not None:
        check_checkpoint(str(first_stage))
    out = Path(out)
    args = BuildArgs(str(Path(checkpoint).resolve()), sha256_file(checkpoint), str(Path(root).resolve()), split, side,
                     chunk, ann, [i_shard, n_shards], sha256_file(first_stage) if first_stage is not None else None)
    old = _read_json(out / "meta.json", out) if (out / "meta.json").exists() else None
    if old is not None and not args.same_build(old):
        raise DataError(out, "the folder holds another index (other checkpoint, split, side, chunk, ann or shard)",
                        "pass another --out, or delete the folder to rebuild it")
    if old is not None and old.get("complete"):
        return out
    model = load_model(checkpoint)
    dm = gallery_datamodule(model, root, split, parser)
    ds = dm.dataset("test")
    fs_model = load_model(first_stage) if first_stage is not None else model
    fs_dm = gallery_datamodule(fs_model, root, split, parser) if first_stage is not None else dm
    fs_ds, fs_col = fs_dm.dataset("test"), dict(with_pos=fs_dm.with_pos, with_graphs=fs_dm.with_graphs)

    def stage1(emb: dict, items: range) -> torch.Tensor:
        if first_stage is None:
            return model.global_embedding(emb, side)
        return fs_model.global_embedding(_encode(fs_model, collate([fs_ds[i] for i in items], **fs_col), side), side)

    data = dm.split_data("test")
    k = data.caps_per_image
    lo, hi = i_shard * len(ds) // n_shards, (i_shard + 1) * len(ds) // n_shards  # this shard's images
    n_images = hi - lo
    if n_images < 1:
        raise ValueError(f"shard {i_shard}/{n_shards} of {len(ds)} images is empty: use fewer shards")
    n_chunks = -(-n_images // chunk)
    col = dict(with_pos=dm.with_pos, with_graphs=dm.with_graphs)
    if old is None:
        # the probe: the image holding the gallery's longest caption gives every tensor its largest per-item shape
        longest = int(np.argmax(np.diff(ds.tokens.offsets)))
        probe = _encode(model, collate([ds[longest // k]], **col), side)
        shapes = {key: (tuple(v.shape[1:]), _store_dtype(v)) for key, v in probe.items()}
        g = stage1(probe, range(longest // k, longest // k + 1))
        items = n_images if side == "images" else n_images * k
        offset = lo if side == "images" else lo * k  # the id of this shard's first item in the split
        ids = list(range(offset, offset + items))
        captions = data.captions[offset : offset + items] if side == "captions" else \
            [data.captions[i * k : (i + 1) * k] for i in range(lo, hi)]
        meta = {**asdict(args), "method": f"{type(model).__module__}.{type(model).__qualname__}",
                "vocab": model.vocab_words, "vocab_sha256": vocabulary_digest(model.vocab_words),
                "caps_per_image": k, "n_items": items, "n_split_items": len(ds) * (1 if side == "images" else k),
                "offset": offset, "ids": ids, "first_stage": str(Path(first_stage).resolve()) if first_stage else None,
                "captions": captions, "parser": parser}
        writer = IndexWriter.create(out, meta, shapes, int(g.shape[1]), n_chunks)
    else:
        writer = IndexWriter.reopen(out, old)
    start_chunk = writer.chunks_done()
    for c in track(range(start_chunk, n_chunks), desc=f"indexing {side}", enabled=progress):
        if stop_after is not None and c - start_chunk >= stop_after:
            return out
        a, b = c * chunk, min(n_images, (c + 1) * chunk)
        emb = _encode(model, collate([ds[lo + i] for i in range(a, b)], **col), side)
        glob = stage1(emb, range(lo + a, lo + b)).float().cpu().numpy()
        arrays = {key: v.cpu().numpy().astype(writer.arrays[key].dtype) for key, v in emb.items()}
        writer.write(c, a if side == "images" else a * k, arrays, glob)
    writer.finish(ann)
    return out


# ---- querying -------------------------------------------------------------------------------------------------------
@dataclass
class Hit:
    rank: int
    id: int
    score: float
    caption: str


@dataclass
class Results:
    hits: list[Hit]
    oov: list[str] = field(default_factory=list)
    candidates: int = 0
    ms: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> list[dict]:
        return [asdict(h) for h in self.hits]


class Index:
    """An index folder opened for queries, checked against its checkpoint (sha256, vocabulary) and for corruption.

    ckpt: the checkpoint to score with (default: the path the index was built from); it must be the same file
    (sha256). model: an already loaded module of that checkpoint (skips loading it again)."""

    def __init__(self, folder: str | Path, ckpt: str | Path | None = None, model: RetrievalModule | None = None,
                 device: str = "cpu", check_sha: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise DataError(self.folder, "no such index folder", "build it first: `zoo-search build ... --out DIR`")
        meta = _read_json(self.folder / "meta.json", self.folder)
        if meta.get("format") != FORMAT:
            raise DataError(self.folder / "meta.json", f"index format {meta.get('format')} is not this zoo's {FORMAT}",
                            REBUILD)
        if not meta.get("complete"):
            done = _read_json(self.folder / "progress.json", self.folder).get("chunks_done", 0) \
                if (self.folder / "progress.json").exists() else 0
            raise DataError(self.folder, f"the index is half-built ({done} of {meta.get('n_chunks')} chunks written; "
                            "the build was interrupted or is still running)",
                            "run the same `zoo-search build` command again: it resumes where it stopped")
        self.meta = meta
        self.n = int(meta["n_items"])
        self.side = meta["side"]
        self.emb: dict[str, np.ndarray] = {}
        for key, spec in meta["keys"].items():
            self.emb[key] = self._open(f"emb_{key}.npy", (self.n, *spec["shape"]), spec["dtype"])
        self.glob = self._open("global.npy", (self.n, meta["global_dim"]), "float32")
        self.per_item = {k: list(v["shape"]) for k, v in meta["keys"].items()}
        faiss = _faiss()
        try:
            self.faiss = faiss.read_index(str(self.folder / "index.faiss"))
        except Exception as e:  # faiss raises RuntimeError with its C++ message
            raise DataError(self.folder / "index.faiss", f"the index is corrupt (FAISS cannot read it: "
                            f"{str(e).splitlines()[0][:200]})", REBUILD) from None
        if meta.get("ann") == "ivf":
            faiss.extract_index_ivf(self.faiss).nprobe = min(IVF_NPROBE, faiss.extract_index_ivf(self.faiss).nlist)
        if self.faiss.ntotal != self.n or self.faiss.d != meta["global_dim"]:
            raise DataError(self.folder / "index.faiss", f"the index is corrupt (FAISS holds {self.faiss.ntotal} "
                            f"vectors of {self.faiss.d} dims, meta.json says {self.n} of {meta['global_dim']})",
                            REBUILD)
        self.device = torch.device(device)
        if model is None:
            ckpt = Path(ckpt if ckpt is not None else meta["checkpoint"])
            check_checkpoint(str(ckpt))
            if check_sha:
                sha = sha256_file(ckpt)
                if sha != meta["checkpoint_sha256"]:
                    raise DataError(ckpt, f"this checkpoint (sha256 {sha[:12]}...) is not the one the index "
                                    f"{self.folder} was built with ({meta['checkpoint_sha256'][:12]}..., "
                                    f"{meta['checkpoint']}): its scores would not match the stored embeddings",
                                    "query with the checkpoint the index was built from, or rebuild the index with "
                                    "this one (`zoo-search build --ckpt ...`)")
            model = load_model(ckpt)
        if vocabulary_digest(model.vocab_words) != meta.get("vocab_sha256"):
            n_model = len(model.vocab_words) if model.vocab_words else 0
            raise DataError(self.folder / "meta.json", "the index was built with another vocabulary "
                            f"({len(meta['vocab'] or [])} "
                            f"words) than the checkpoint's ({n_model} words): word ids would mean other words",
                            "rebuild the index with this checkpoint, or query with the one it was built from")
        self.model = model.to(self.device).eval()
        self.fs_model = None  # the first-stage checkpoint's model, where the index was built with one
        if meta.get("first_stage_sha256"):
            fs = Path(meta["first_stage"])
            check_checkpoint(str(fs))
            if check_sha and sha256_file(fs) != meta["first_stage_sha256"]:
                raise DataError(fs, f"this first-stage checkpoint is not the one the index {self.folder} was built "
                                "with (sha256 differs)", "rebuild the index with --first-stage pointing at it")
            self.fs_model = load_model(fs).to(self.device).eval()
        self._dm: dict[int, PrecompDataModule] = {}

    def _open(self, name: str, shape: tuple, dtype: str) -> np.ndarray:
        path = self.folder / name
        try:
            a = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise DataError(path, "the index is corrupt (file missing)", REBUILD) from None
        except (ValueError, OSError) as e:
            raise DataError(path, f"the index is corrupt ({e})", REBUILD) from None
        if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
            raise DataError(path, f"the index is corrupt ({a.dtype.name} {tuple(a.shape)} on disk, meta.json says "
                            f"{dtype} {tuple(shape)})", REBUILD)
        return a

    # ---- the query's own item --------------------------------------------------------------------------------------
    def datamodule(self, model: RetrievalModule | None = None) -> PrecompDataModule:
        model = model or self.model
        if id(model) not in self._dm:
            self._dm[id(model)] = gallery_datamodule(model, self.meta["root"], self.meta["split"],
                                                     self.meta.get("parser", "spacy"))
        return self._dm[id(model)]

    def encode_text(self, text: str, model: RetrievalModule | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The caption side of a text query, and its words the checkpoint's vocabulary does not hold (read as <unk>).
        With a first-stage checkpoint, its global vector of the query rides along (key FIRST_STAGE)."""
        if model is None and self.fs_model is not None:
            emb, oov = self.encode_text(text, self.model)
            fs_emb, _ = self.encode_text(text, self.fs_model)
            with torch.no_grad():
                emb[FIRST_STAGE] = self.fs_model.global_embedding(fs_emb, "captions")
            return emb, oov
        model = model or self.model
        words = tokenize(text)
        if not words:
            raise ValueError("empty query: type a few words")
        vocab = Vocabulary.from_words(model.vocab_words) if model.vocab_words is not None else None
        oov = [w for w in words if vocab is not None and w not in vocab.word2idx]
        ids = vocab.encode(words) if vocab is not None else [0] * (len(words) + 2)
        item = {"tokens": np.asarray(ids, dtype=np.int64), "caption_id": 0}
        req = model.required_inputs
        if "pos" in req or "graphs" in req:
            from datamodules.parsing import UPOS_ID, get_parser

            parse = get_parser(self.meta.get("parser", "spacy")).parse([words])[0]
            item["upos"] = np.asarray([UPOS_ID.get(t, 0) for t in parse.upos], dtype=np.int64)
            item["heads"] = np.asarray(parse.heads, dtype=np.int64)
        if "subwords" in req:
            from datamodules.datasets import SubwordCaptions

            tok = self.datamodule(model).subword_tokenizer_obj
            item["subword_ids"], item["subword_to_word"] = SubwordCaptions([text], tok)[0]
        if getattr(model, "sg_reading", None) == "caption_labels":
            raise ValueError(f"{type(model).__name__} with sg_reading caption_labels reads the caption's ground-truth "
                             "labels, which a typed query has not: search with another reading")
        batch = collate([{"image_id": 0, "captions": [item]}], with_pos="pos" in req, with_graphs="graphs" in req)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return _encode(model, batch, "captions"), oov

    def encode_image(self, image_id: int, model: RetrievalModule | None = None) -> dict[str, torch.Tensor]:
        """The image side of an image query: image `image_id` of the index's root/split (with a first-stage
        checkpoint, its global vector under key FIRST_STAGE)."""
        if model is None and self.fs_model is not None:
            emb = self.encode_image(image_id, self.model)
            with torch.no_grad():
                emb[FIRST_STAGE] = self.fs_model.global_embedding(self.encode_image(image_id, self.fs_model), "images")
            return emb
        model = model or self.model
        dm = self.datamodule(model)
        ds = dm.dataset("test")
        if not 0 <= image_id < len(ds):
            raise IndexError(f"--image-id {image_id}: {self.meta['split']} has images 0..{len(ds) - 1}")
        batch = collate([ds[image_id]], with_pos=dm.with_pos, with_graphs=dm.with_graphs)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return _encode(model, batch, "images")

    # ---- scoring ---------------------------------------------------------------------------------------------------
    def _gallery(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Embeddings of gallery items `ids` (ascending) in float32 on the device, caption padding trimmed."""
        contiguous = ids.size and ids[-1] - ids[0] + 1 == ids.size
        arrays = {k: (a[ids[0] : ids[-1] + 1] if contiguous else a[ids]) for k, a in self.emb.items()}
        emb = _to_torch(arrays, self.device)
        # CCCL trims its own chunks (by n_words); a "lengths" gallery is cut to the block's longest caption here
        return trim_padding(emb) if self.side == "captions" else emb

    @torch.no_grad()
    def score_items(self, query: dict[str, torch.Tensor], ids: np.ndarray) -> np.ndarray:
        """The method's exact `score` of the query with gallery items `ids` (ascending), SCORE_BLOCK items a call."""
        out = np.empty(ids.size, dtype=np.float32)
        query = {k: v for k, v in query.items() if k != FIRST_STAGE}
        for a in range(0, ids.size, SCORE_BLOCK):
            g = self._gallery(ids[a : a + SCORE_BLOCK])
            s = self.model.score(g, query)[:, 0] if self.side == "images" else self.model.score(query, g)[0]
            out[a : a + SCORE_BLOCK] = s.float().cpu().numpy()
        return out

    def first_stage(self, query: dict[str, torch.Tensor], n: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-n rows of this folder by the global vector (FAISS inner product): (rows, inner products), best
        first."""
        q_side = "captions" if self.side == "images" else "images"
        with torch.no_grad():
            g = query[FIRST_STAGE] if FIRST_STAGE in query else self.model.global_embedding(query, q_side)
            q = g.float().cpu().numpy()
        sims, rows = self.faiss.search(np.ascontiguousarray(q, dtype=np.float32), min(n, self.n))
        keep = rows[0] >= 0
        return rows[0][keep], sims[0][keep]

    @property
    def offset(self) -> int:
        return int(self.meta.get("offset", 0))

    def check_query(self, text, image) -> None:
        if (text is None) == (image is None):
            raise ValueError("give exactly one of text= and image=")
        if text is not None and self.side != "images":
            raise ValueError(f"{self.folder} is a caption gallery: query it with an image (image=N / --image-id N)")
        if image is not None and self.side != "captions":
            raise ValueError(f"{self.folder} is an image gallery: query it with text (text=... / --text ...)")

    def encode_query(self, text, image) -> tuple[dict[str, torch.Tensor], list[str]]:
        self.check_query(text, image)
        return self.encode_text(text) if text is not None else (self.encode_image(int(image)), [])

    def query(self, text: str | None = None, image: int | None = None, k: int = 10, rerank: int | None = 100,
              query_emb: dict[str, torch.Tensor] | None = None) -> Results:
        """Top-k gallery items for a text query (image galleries) or image `image` of the split (caption galleries).

        rerank: stage-1 candidates re-scored exactly; None = score the whole gallery exactly (the reference).
        query_emb: an already encoded query (benchmarks)."""
        return ShardedIndex([self]).query(text, image, k, rerank, query_emb)

    def caption(self, row: int) -> str:
        """The caption of a row (caption galleries), or the image's first caption (image galleries)."""
        caps = self.meta.get("captions")
        if not caps or len(caps) != self.n:
            return ""
        c = caps[row]
        return c[0] if isinstance(c, list) else c


class ShardedIndex:
    """Index folders of one gallery built in shards (`build_index(shard=(i, n))`, `zoo-search build --shard i/n`),
    queried as one: each shard gives its top `rerank` by the global vector, the merged top `rerank` are re-ranked
    exactly, each by the shard that holds it. Item ids are the split's."""

    def __init__(self, shards: list[Index]):
        if not shards:
            raise ValueError("no index folders given")
        self.shards = sorted(shards, key=lambda s: s.offset)
        first = self.shards[0].meta
        for s in self.shards[1:]:
            for key in ("checkpoint_sha256", "first_stage_sha256", "split", "side", "vocab_sha256", "n_split_items",
                        "global_dim"):
                if s.meta.get(key) != first.get(key):
                    raise DataError(s.folder, f"this shard's {key} ({s.meta.get(key)}) differs from "
                                    f"{self.shards[0].folder}'s ({first.get(key)}): not shards of one index",
                                    "query the shards of one build together")
        covered = [(s.offset, s.offset + s.n) for s in self.shards]
        total = first.get("n_split_items", self.shards[0].n)
        if covered[0][0] != 0 or any(a[1] != b[0] for a, b in zip(covered, covered[1:])) or covered[-1][1] != total:
            raise DataError(self.shards[0].folder, f"the shards cover items {covered} of 0..{total - 1}: some are "
                            "missing "
                            "or given twice", "pass every shard folder of the build once (--shard 0/n ... n-1/n)")
        self.n, self.side, self.model = total, self.shards[0].side, self.shards[0].model
        for s in self.shards[1:]:
            s.model = self.model  # one model scores every shard (the same checkpoint, checked above)

    @classmethod
    def open(cls, folders: list[str | Path], ckpt: str | Path | None = None, device: str = "cpu") -> "ShardedIndex":
        first = Index(folders[0], ckpt=ckpt, device=device)
        return cls([first] + [Index(f, ckpt=ckpt, model=first.model, device=device) for f in folders[1:]])

    def query(self, text: str | None = None, image: int | None = None, k: int = 10, rerank: int | None = 100,
              query_emb: dict[str, torch.Tensor] | None = None) -> Results:
        """Top-k gallery items for a text query (image galleries) or image `image` of the split (caption galleries).

        rerank: stage-1 candidates re-scored exactly; None = score the whole gallery exactly (the reference).
        query_emb: an already encoded query (benchmarks)."""
        t0 = time.perf_counter()
        oov: list[str] = []
        if query_emb is None:
            query_emb, oov = self.shards[0].encode_query(text, image)
        if rerank is not None and rerank < 1:
            raise ValueError(f"rerank must be >= 1 or None (exhaustive), got {rerank}")
        t1 = time.perf_counter()
        if rerank is None:
            picked = [np.arange(s.n) for s in self.shards]
        else:
            n = max(rerank, k)
            found = [s.first_stage(query_emb, n) for s in self.shards]
            ids = np.concatenate([s.offset + rows for s, (rows, _) in zip(self.shards, found)])
            sims = np.concatenate([g for _, g in found])
            top = ids[np.lexsort((ids, -sims))[:n]]  # the merged top n by inner product, ties by id
            picked = [np.sort(top[(top >= s.offset) & (top < s.offset + s.n)] - s.offset) for s in self.shards]
        t2 = time.perf_counter()
        ids = np.concatenate([s.offset + rows for s, rows in zip(self.shards, picked)])
        scores = np.concatenate([s.score_items(query_emb, rows) for s, rows in zip(self.shards, picked)])
        order = np.lexsort((ids, -scores))[:k]  # by score, ties by id
        t3 = time.perf_counter()
        hits = []
        for r, j in enumerate(order):
            shard = next(s for s in self.shards if s.offset <= ids[j] < s.offset + s.n)
            hits.append(Hit(r + 1, int(ids[j]), float(scores[j]), shard.caption(int(ids[j]) - shard.offset)))
        return Results(hits, oov, int(ids.size), {"encode": 1e3 * (t1 - t0), "first_stage": 1e3 * (t2 - t1),
                                                  "rerank": 1e3 * (t3 - t2)})
