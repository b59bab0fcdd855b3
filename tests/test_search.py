"""Search (zoo.search): an index built from a checkpoint trained a few steps on a tiny SynthScenes, two-stage queries
against the exhaustive reference, the command, and the clear errors (other checkpoint or vocabulary, corrupt or
half-built index)."""
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

pytest.importorskip("faiss")  # the `search` extra, which `make venv` installs

from zoo.cli import ZooCLI  # noqa: E402
from zoo.engine.checkpoints import load_model  # noqa: E402
from zoo.engine.evaluation import score_blockwise  # noqa: E402
from zoo.engine.module import RetrievalModule  # noqa: E402
from zoo.search import Index, build_index  # noqa: E402
from zoo.search import cli as search_cli  # noqa: E402
from zoo.search.index import gallery_datamodule  # noqa: E402
from datamodules.datasets import collate  # noqa: E402
from datamodules.errors import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_tiny(recipe: str, root: Path, out: Path, extra=(), steps: int = 3) -> Path:
    """A checkpoint of `recipe` trained `steps` steps on a tiny SynthScenes generated into `root`."""
    shrink = ["--data.init_args.root", str(root), "--data.init_args.n_train", "24", "--data.init_args.n_dev", "4",
              "--data.init_args.n_test", "12", "--data.init_args.feature_dim", "16",
              "--data.init_args.num_regions", "5",
              "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
              "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "4",
              "--model.init_args.feature_dim", "16", "--model.init_args.embed_dim", "8",
              "--model.init_args.word_dim", "4",
              *extra]
    cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(ROOT / "recipes" / recipe), *shrink])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(cli.model, cli.datamodule)
    ckpt = out / f"{Path(recipe).stem}.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def casc_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("search")
    torch.set_num_threads(1)
    root = base / "ss"
    ckpt = train_tiny("casc_base_synth.yaml", root, base)
    return ckpt, root, base


@pytest.fixture(scope="module")
def image_index(casc_base):
    ckpt, root, base = casc_base
    return build_index(ckpt, root, "test", "images", base / "img_index", chunk=5, progress=False)


def test_global_embedding_default_is_the_unit_mean_of_regions_and_words(casc_base):
    ckpt, root, _ = casc_base
    model = load_model(ckpt)
    dm = gallery_datamodule(model, root, "test")
    batch = collate([dm.dataset("test")[i] for i in range(3)])
    with torch.no_grad():
        img, cap = model.encode_images(batch), model.encode_captions(batch)
        g_img, g_cap = model.global_embedding(img, "images"), model.global_embedding(cap, "captions")
    ref_img = img["regions"].mean(1)
    ref_img = ref_img / ref_img.norm(dim=-1, keepdim=True)
    assert torch.allclose(g_img, ref_img, atol=1e-6)
    for c in range(cap["words"].shape[0]):  # one caption at a time, only its real words
        n = int(cap["lengths"][c])
        v = cap["words"][c, :n].mean(0)
        assert torch.allclose(g_cap[c], v / v.norm(), atol=1e-6)


def test_two_stage_equals_exhaustive_when_rerank_covers_the_gallery(casc_base, image_index):
    ckpt, root, _ = casc_base
    idx = Index(image_index)
    assert idx.n == 12 and idx.meta["method"] == "zoo.methods.casc_base.CASCBase"
    text = idx.meta["captions"][3][0]
    exact = idx.query(text=text, k=12, rerank=None)
    two = idx.query(text=text, k=12, rerank=12)
    assert [h.id for h in two.hits] == [h.id for h in exact.hits]
    assert [h.score for h in two.hits] == [h.score for h in exact.hits]
    assert two.candidates == 12 and exact.oov == []
    # the exhaustive reference is the method's score on fp32 embeddings of the same split (fp16 storage: close)
    model = load_model(ckpt)
    dm = gallery_datamodule(model, root, "test")
    batch = collate([dm.dataset("test")[i] for i in range(12)])
    q = dict(idx.encode_text(text)[0])
    with torch.no_grad():
        ref = score_blockwise(model.score, model.encode_images(batch), q, 4, 4)[:, 0]
    got = torch.tensor([h.score for h in sorted(exact.hits, key=lambda h: h.id)])
    assert torch.allclose(got, ref, atol=2e-3)
    # fewer candidates: each hit's score is still the exact one, and the list is a ranking of them
    few = idx.query(text=text, k=3, rerank=4)
    by_id = {h.id: h.score for h in exact.hits}
    assert len(few.hits) == 3 and few.candidates == 4
    assert all(h.score == by_id[h.id] for h in few.hits)
    assert [h.score for h in few.hits] == sorted([h.score for h in few.hits], reverse=True)


def test_image_query_on_a_caption_gallery(casc_base, tmp_path):
    ckpt, root, _ = casc_base
    out = build_index(ckpt, root, "test", "captions", tmp_path / "cap", chunk=4, progress=False)
    idx = Index(out)
    assert idx.n == 60 and idx.side == "captions"
    exact = idx.query(image=2, k=60, rerank=None)
    two = idx.query(image=2, k=60, rerank=60)
    assert [(h.id, h.score) for h in two.hits] == [(h.id, h.score) for h in exact.hits]
    assert exact.hits[0].caption == idx.meta["captions"][exact.hits[0].id]
    with pytest.raises(ValueError, match="caption gallery"):
        idx.query(text="a dog")
    with pytest.raises(IndexError, match="images 0..11"):
        idx.query(image=99)


def test_out_of_vocabulary_words_are_reported(image_index):
    res = Index(image_index).query(text="a zebroid and a red quuxle", k=2)
    assert res.oov == ["zebroid", "quuxle"] and len(res.hits) == 2


def test_an_interrupted_build_is_refused_then_resumes_to_the_same_index(casc_base, image_index, tmp_path):
    ckpt, root, _ = casc_base
    out = tmp_path / "resumed"
    build_index(ckpt, root, "test", "images", out, chunk=5, progress=False, stop_after=1)
    with pytest.raises(DataError, match="half-built .*1 of 3 chunks"):
        Index(out)
    build_index(ckpt, root, "test", "images", out, chunk=5, progress=False)
    for name in ("emb_regions.npy", "global.npy"):
        assert np.array_equal(np.load(out / name), np.load(Path(image_index) / name))
    with pytest.raises(DataError, match="another index"):
        build_index(ckpt, root, "test", "captions", out, chunk=5, progress=False)


def test_another_checkpoint_or_vocabulary_is_refused(casc_base, image_index, tmp_path):
    ckpt, root, base = casc_base
    other = tmp_path / "other.ckpt"
    state = torch.load(ckpt, weights_only=False)
    first = next(k for k in state["state_dict"] if k.endswith("weight"))
    state["state_dict"][first] = state["state_dict"][first] + 1.0
    torch.save(state, other)
    with pytest.raises(DataError, match="not the one the index .* was built with"):
        Index(image_index, ckpt=other)
    model = load_model(ckpt)
    model.vocab_words = list(reversed(model.vocab_words))
    with pytest.raises(DataError, match="another vocabulary"):
        Index(image_index, model=model)


def test_a_corrupt_index_says_so(image_index, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(image_index, bad)
    (bad / "index.faiss").write_bytes(b"not faiss")
    with pytest.raises(DataError, match="corrupt .*FAISS"):
        Index(bad)
    shutil.copy(Path(image_index) / "index.faiss", bad / "index.faiss")
    np.save(bad / "global.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(DataError, match="corrupt"):
        Index(bad)
    (bad / "meta.json").write_text("{")
    with pytest.raises(DataError, match="corrupt .*meta.json"):
        Index(bad)
    with pytest.raises(DataError, match="not a search index"):
        Index(tmp_path)


def test_command_build_and_query_json(casc_base, tmp_path, capsys):
    ckpt, root, _ = casc_base
    out = tmp_path / "cmd"
    search_cli.main(["build", "--ckpt", str(ckpt), "--root", str(root), "--split", "test", "--side", "images",
                     "--out", str(out), "--chunk", "6", "--no-progress"])
    capsys.readouterr()
    search_cli.main(["query", str(out), "--text", "a red dog and a blorf", "-k", "3", "--rerank", "5", "--json"])
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [r["rank"] for r in rows] == [1, 2, 3] and set(rows[0]) == {"rank", "id", "score", "caption"}
    assert "blorf" in captured.err
    search_cli.main(["query", str(out), "--text", "a red dog", "-k", "2", "--exact"])
    assert "rank" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [("casc_synth.yaml", ["--model.init_args.label_hidden", "8"]),
                                           ("cccl_synth.yaml", ["--model.init_args.sim_dim", "4"])])
def test_two_stage_equals_exhaustive_for_casc_and_cccl(recipe, extra, tmp_path, one_thread):
    root = tmp_path / "ss"
    ckpt = train_tiny(recipe, root, tmp_path, extra, steps=1)
    for name in ("ims.npy", "boxes.npy", "caps.txt"):  # a split nothing has parsed yet (CCCL's graphs: parsed here)
        shutil.copy(root / f"test_{name}", root / f"fresh_{name}")
    for side, query in (("images", {"text": "a red dog to the left of a ball"}), ("captions", {"image": 1})):
        idx = Index(build_index(ckpt, root, "fresh", side, tmp_path / side, chunk=5, progress=False))
        exact = idx.query(**query, k=idx.n, rerank=None)
        two = idx.query(**query, k=idx.n, rerank=idx.n)
        assert [(h.id, h.score) for h in two.hits] == [(h.id, h.score) for h in exact.hits]
        assert np.isfinite([h.score for h in exact.hits]).all()
    if recipe.startswith("cccl"):  # CCCL's first stage: its global branch's vectors (Eqs. 13-14), unit length
        model = load_model(ckpt)
        dm = gallery_datamodule(model, root, "fresh")
        with torch.no_grad():
            img = model.encode_images(collate([dm.dataset("test")[i] for i in range(3)]))
        g = model.global_embedding(img, "images")
        assert torch.allclose(g, img["global"] / img["global"].norm(dim=-1, keepdim=True), atol=1e-6)


def test_quality_table_two_stage_reaches_exact_at_full_rerank(casc_base, tmp_path):
    from zoo.search import quality

    ckpt, root, _ = casc_base
    rows = quality.measure(str(ckpt), str(root), tmp_path / "q", reranks=[2, 60], progress=False)
    by = {r["rerank"]: r for r in rows}
    assert set(by) == {"exact (zoo.metrics)", "exact (index)", 2, 60}
    # 60 candidates cover both galleries (12 images, 60 captions): two-stage is the exact ranking
    assert all(by[60][c] == by["exact (index)"][c] for c in quality.COLS) and by[60]["top10_t2i"] == 100.0
    assert by[2]["top10_i2t"] == by[2]["top10_t2i"] == 0.0  # 2 candidates never hold an exact top-10
    quality.write_report(rows, tmp_path / "q", "tiny")
    assert (tmp_path / "q" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 60 |" in (tmp_path / "q" / "quality.md").read_text()


def test_bench_search_runs_small(tmp_path, capsys, one_thread):
    from zoo.bench import search as bench

    bench.main(["--sizes", "300", "2000", "--full-max", "300", "--exhaustive-max", "300", "--dim", "16",
                "--regions", "4", "--max-words", "8", "--queries", "3", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("two-stage rerank=100") == 2 and out.count("exhaustive exact") == 2
    assert "stage 1 only, flat" in out and "stage 1 only, ivf (recall" in out and "2000" in out


def test_two_shards_equal_one_index(casc_base, image_index, tmp_path):
    from zoo.search import ShardedIndex

    ckpt, root, _ = casc_base
    parts = [build_index(ckpt, root, "test", "images", tmp_path / f"s{i}", chunk=4, progress=False, shard=(i, 2))
             for i in range(2)]
    one = Index(image_index)
    both = ShardedIndex.open([parts[1], parts[0]])  # any order
    assert [s.offset for s in both.shards] == [0, 6] and both.n == 12
    text = one.meta["captions"][5][1]
    for rerank in (3, 7, None):
        a, b = one.query(text=text, k=5, rerank=rerank), both.query(text=text, k=5, rerank=rerank)
        assert [h.id for h in a.hits] == [h.id for h in b.hits] and a.candidates == b.candidates
        assert np.allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-6)
        assert [h.caption for h in a.hits] == [h.caption for h in b.hits]
    with pytest.raises(DataError, match="missing or given twice"):
        ShardedIndex.open([parts[0]])
    search_cli.main(["query", str(parts[0]), str(parts[1]), "--text", text, "-k", "2", "--json"])
    with pytest.raises(ValueError, match="i/n"):
        search_cli.main(["build", "--ckpt", str(ckpt), "--root", str(root), "--out", str(tmp_path / "x"),
                         "--shard", "2"])


def test_page_and_api(casc_base, image_index, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from zoo.search import ShardedIndex
    from zoo.search.serve import create_app

    ckpt, root, _ = casc_base
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "3.png").write_bytes(b"\x89PNG fake")
    idx = ShardedIndex.open([image_index])
    client = TestClient(create_app(idx, images=pics))
    page = client.get("/")
    assert page.status_code == 200 and "<input id=\"q\"" in page.text and "CASCBase" in page.text
    text = idx.shards[0].meta["captions"][3][0]
    r = client.get("/api/search", params={"q": text + " zonk", "k": 12})
    assert r.status_code == 200
    data = r.json()
    assert data["oov"] == ["zonk"] and [h["rank"] for h in data["results"]] == list(range(1, 13))
    ref = idx.query(text=text + " zonk", k=12)
    assert [h["id"] for h in data["results"]] == [h.id for h in ref.hits]
    hit = data["results"][0]
    assert len(hit["boxes"]) == 5 and len(hit["weights"]) == 5 and abs(sum(hit["weights"]) - 1) < 1e-4
    assert {h["id"]: h["image"] for h in data["results"]}[3] == "/api/image/3"
    assert client.get("/api/image/3").content == b"\x89PNG fake"
    assert client.get("/api/image/4").status_code == 404
    bad = client.get("/api/search", params={"image": 1})
    assert bad.status_code == 400 and "image gallery" in bad.json()["detail"]


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_approximate_first_stage_options(casc_base, image_index, tmp_path, ann):
    ckpt, root, _ = casc_base
    idx = Index(build_index(ckpt, root, "test", "images", tmp_path / ann, chunk=6, ann=ann, progress=False))
    text = idx.meta["captions"][1][0]
    exact = Index(image_index).query(text=text, k=12, rerank=None)
    got = idx.query(text=text, k=12, rerank=12)
    assert idx.meta["ann"] == ann and [h.id for h in got.hits] == [h.id for h in exact.hits]


def _browser():
    """Debian's chromium + chromium-driver (`.ci/run` installs them when missing) driven by selenium, headless."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium / chromedriver missing: `.ci/run` installs them "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


@pytest.mark.slow
def test_page_in_a_headless_browser(casc_base, image_index, tmp_path):
    import socket
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from zoo.search import ShardedIndex
    from zoo.search.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ShardedIndex.open([image_index])), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        assert browser.title == "zoo-search"
        box = browser.find_element(By.ID, "q")
        box.send_keys("a red dog and a ball")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "results").get_attribute("data-count"))
        hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
        assert len(hits) == 10 and hits[0].find_element(By.CSS_SELECTOR, ".rank").text == "1"
        assert len(hits[0].find_elements(By.CSS_SELECTOR, "svg rect")) == 5  # the 5 region boxes, shaded
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:4] == b"\x89PNG"
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)


def test_first_stage_from_another_checkpoint(casc_base, image_index, tmp_path):
    from zoo.search.index import FIRST_STAGE

    ckpt, root, _ = casc_base
    other = tmp_path / "first.ckpt"
    state = torch.load(ckpt, weights_only=False)
    for name in state["state_dict"]:
        if name.startswith("image_encoder"):
            state["state_dict"][name] = state["state_dict"][name] * -1.5
    torch.save(state, other)
    idx = Index(build_index(ckpt, root, "test", "images", tmp_path / "fs", chunk=5, progress=False, first_stage=other))
    fs_model = load_model(other)
    dm = gallery_datamodule(fs_model, root, "test")
    with torch.no_grad():
        want = fs_model.global_embedding(fs_model.encode_images(collate([dm.dataset("test")[i] for i in range(12)])),
                                         "images")
    assert np.allclose(idx.glob[:], want.numpy(), atol=1e-6)
    assert not np.allclose(idx.glob[:], Index(image_index).glob[:], atol=1e-3)
    text = idx.meta["captions"][2][0]
    q, _ = idx.encode_text(text)
    assert FIRST_STAGE in q and q[FIRST_STAGE].shape == (1, want.shape[1])
    exact = Index(image_index).query(text=text, k=12, rerank=None)  # stage 2 is still the main checkpoint's score
    got = idx.query(text=text, k=12, rerank=12)
    assert [(h.id, h.score) for h in got.hits] == [(h.id, h.score) for h in exact.hits]


@pytest.fixture(scope="module")
def vse_infinity(casc_base):
    _, root, base = casc_base  # the same tiny SynthScenes (and so the same vocabulary) as casc_base
    return train_tiny("vse_infinity_synth.yaml", root, base)


def test_a_global_method_s_first_stage_is_its_own_score(vse_infinity, casc_base, tmp_path):
    """VSE-infinity's global_embedding is its (unit) vector, so stage 1 alone already ranks as its exact score:
    two-stage with rerank = k gives the exhaustive ids for every query."""
    _, root, _ = casc_base
    model = load_model(vse_infinity)
    dm = gallery_datamodule(model, root, "test")
    batch = collate([dm.dataset("test")[i] for i in range(4)])
    with torch.no_grad():
        img, cap = model.encode_images(batch), model.encode_captions(batch)
    assert torch.allclose(model.global_embedding(img, "images"), img["vector"], atol=1e-6)  # already unit length
    assert torch.allclose(model.global_embedding(cap, "captions"), cap["vector"], atol=1e-6)
    idx = Index(build_index(vse_infinity, root, "test", "images", tmp_path / "vse", chunk=5, progress=False))
    for text in [c for caps in idx.meta["captions"][:4] for c in caps[:2]]:
        exact = idx.query(text=text, k=3, rerank=None)
        got = idx.query(text=text, k=3, rerank=3)
        assert [h.id for h in got.hits] == [h.id for h in exact.hits]
        assert np.allclose([h.score for h in got.hits], [h.score for h in exact.hits], atol=1e-5)


def test_vse_infinity_as_the_first_stage_of_a_cross_attention_re_ranker(casc_base, image_index, vse_infinity,
                                                                         tmp_path):
    ckpt, root, _ = casc_base
    idx = Index(build_index(ckpt, root, "test", "images", tmp_path / "fs", chunk=5, progress=False,
                            first_stage=vse_infinity))
    fs = Index(build_index(vse_infinity, root, "test", "images", tmp_path / "vse", chunk=5, progress=False))
    assert np.allclose(idx.glob[:], fs.glob[:], atol=1e-6)  # stage 1 = VSE-infinity's vectors
    text = idx.meta["captions"][5][0]
    exact = Index(image_index).query(text=text, k=12, rerank=None)  # stage 2 = CASC-base's exact score
    got = idx.query(text=text, k=12, rerank=12)
    assert [(h.id, h.score) for h in got.hits] == [(h.id, h.score) for h in exact.hits]
    few = idx.query(text=text, k=4, rerank=4)  # the candidates are VSE-infinity's top 4, ordered by CASC-base
    vse_top = {h.id for h in fs.query(text=text, k=4, rerank=None).hits}
    assert {h.id for h in few.hits} == vse_top
