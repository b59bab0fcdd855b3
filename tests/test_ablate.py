"""`make ablate` / `make report` / ensemble: row discovery, the runner (run, skip, resume, fail), W&B offline
records read back, the report against a hand-written expectation, the ensemble against a slow reference."""
import csv
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml

from zoo.experiments import ablate
from zoo.experiments.ablate import checkpoint_callbacks, wandb_setup
from zoo.experiments.rows import discover, parse_label, select
from zoo.experiments.report import kendall_tau, write_report

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
METHODS = sorted(p.name for p in (RECIPES / "ablations").iterdir() if p.is_dir())
ALL_ROWS = [(m, f) for m in METHODS for f in sorted((RECIPES / "ablations" / m).glob("*/*.yaml"))
            if not f.name.startswith("_")]
DATA_SHRINK = ["--data.init_args.root", "ss", "--data.init_args.n_train", "40", "--data.init_args.n_dev", "10",
               "--data.init_args.n_test", "10", "--data.init_args.feature_dim", "32", "--data.init_args.num_regions",
               "6", "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1"]
SHRINK = DATA_SHRINK + ["--model.init_args.feature_dim", "32", "--model.init_args.embed_dim", "16",
                        "--model.init_args.word_dim", "8", "--trainer.enable_model_summary", "false"]


# ---- the layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_list_enumerates_every_row(method, capsys):
    assert ablate.main(["--list", method, "--recipes", str(RECIPES)]) == 0
    out = capsys.readouterr().out
    files = [f for m, f in ALL_ROWS if m == method]
    assert files and f"{len(files)} rows" in out
    for f in files:
        label, _ = parse_label(f)
        assert f.parent.name in out and f.stem.split("_", 1)[1] in out and label and label in out


@pytest.mark.parametrize("method,row", ALL_ROWS, ids=[f"{m}/{f.parent.name}/{f.stem}" for m, f in ALL_ROWS])
def test_every_row_is_a_valid_delta_of_its_synth_recipe(method, row, monkeypatch, capsys, tmp_path):
    """First line `# label — what`, and recipe + row parse together with the row's values in effect. A row of
    another method's recipe (`row: {recipe: ...}`) has that recipe on every dataset and runs on the table's data
    sizes without the table's model settings; an ensemble row names trained rows of its table on every dataset."""
    from zoo.cli import main

    first = row.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and " — " in first, f"{row}: first line must be '# <label> — <what it computes>'"
    r = next(x for x in ablate.select(ablate.discover(method, RECIPES)) if x.path == row)
    abl = ablate.Ablation(method, "synthetic", RECIPES, tmp_path / "runs")
    for data in ("f30k", "coco"):  # the recipe (or every member's) exists on the real datasets too
        other = ablate.Ablation(method, data, RECIPES, tmp_path / "runs")
        for x in other.members(r) or [r]:
            assert other.base_recipe(x).is_file()
    if r.ensemble is not None:
        members = abl.members(r)
        assert len(members) >= 2 and all(m.ensemble is None and m.table == r.table for m in members)
        return
    files = abl.config_files(r)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:  # --print_config exits after printing the merged config
        main(["fit", *[a for f in files for a in ("--config", str(f))], "--print_config"])
    assert e.value.code in (0, None)
    merged = yaml.safe_load(capsys.readouterr().out)
    delta = r.deltas
    base = yaml.safe_load(abl.base_recipe(r).read_text(encoding="utf-8"))
    if r.recipe is None:
        assert merged["model"]["class_path"] == delta["model"]["class_path"]
    else:  # the other method's model as its recipe has it: the table's model settings are not applied
        assert files[0] == RECIPES / f"{r.recipe_name('synthetic')}_synth.yaml" and "row" not in merged
        assert merged["model"]["class_path"] == base["model"]["class_path"]
        for k, v in base["model"]["init_args"].items():
            assert merged["model"]["init_args"][k] == (delta.get("model", {}).get("init_args") or {}).get(k, v), k
    for k, v in ((delta.get("model") or {}).get("init_args") or {}).items():
        assert merged["model"]["init_args"][k] == v, k
    sizes = ablate.sizes_for(method, "synthetic", RECIPES)  # the ablation sizes sit between recipe and row
    if sizes is not None:  # the sizes overlay is in effect under the row
        over = yaml.safe_load(sizes.read_text(encoding="utf-8"))
        for k, v in over["data"]["init_args"].items():
            assert merged["data"]["init_args"][k] == v, k
        assert merged["trainer"]["max_epochs"] == over["trainer"]["max_epochs"]


def _layout(root, rows):
    for rel, text in rows.items():
        p = root / "ablations" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_discovery_rules_and_selection(tmp_path):
    _layout(tmp_path, {"m/t2/01_b.yaml": "# B — bee\nmodel: {}\n", "m/t1/02_y.yaml": "# Y -- why\n",
                       "m/t1/01_x.yaml": "# X — ex — with a dash\n", "m/t1/_base.yaml": "# not a row\n",
                       "m/t1/notes.txt": "x", "m/t1/10_nolabel.yaml": "model: {}\n"})
    tables = discover("m", tmp_path)
    assert list(tables) == ["t1", "t2"]
    assert [(r.order, r.name, r.label, r.what) for r in tables["t1"]] == [
        (1, "x", "X", "ex — with a dash"), (2, "y", "Y", "why"), (10, "nolabel", "nolabel", "")]
    assert [r.key for r in select(tables, rows="b,01_x")] == ["t2/b", "t1/x"]
    assert [r.key for r in select(tables, table="t1", rows="t1/y")] == ["t1/y"]
    with pytest.raises(ValueError, match="no row 'zz'"):
        select(tables, rows="zz")
    with pytest.raises(ValueError, match="no table"):
        select(tables, table="t9")
    with pytest.raises(ValueError, match="methods with rows: m"):
        discover("nope", tmp_path)


def test_real_data_missing_is_a_clear_error(tmp_path, capsys):
    rc = ablate.main(["casc_base", "f30k", "--recipes", str(RECIPES), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "f30k_precomp" in err and "data folder not found" in err and "zoo-prepare" in err
    (tmp_path / "f30k_precomp").mkdir()
    ablate.check_data("f30k", [], tmp_path)  # present: no error
    ablate.check_data("f30k", ["--data.init_args.root", str(tmp_path / "f30k_precomp")], "nowhere")


def test_checkpoints_are_pointed_at_the_row_folder(tmp_path):
    row = tmp_path / "row.yaml"
    row.write_text("model: {}\n")
    plain = tmp_path / "plain.yaml"  # a user's recipe with Lightning's own ModelCheckpoint
    plain.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                     "      init_args: {monitor: val/rsum, mode: max}\n")
    cbs = checkpoint_callbacks(ablate.merged_config(plain, row), tmp_path / "r")
    ckpt = [c for c in cbs if c["class_path"].endswith("ModelCheckpoint")][0]["init_args"]
    assert ckpt["dirpath"] == str(tmp_path / "r" / "checkpoints") and ckpt["save_last"] is True
    assert ckpt["filename"] == "best" and ckpt["monitor"] == "val/rsum"
    zoo_ckpt = tmp_path / "zoo.yaml"
    zoo_ckpt.write_text("trainer:\n  callbacks:\n    - class_path: zoo.callbacks.ZooCheckpoint\n")
    assert checkpoint_callbacks(ablate.merged_config(zoo_ckpt, row), tmp_path / "r") is None  # already writes <root>/checkpoints


def test_rows_with_equal_settings_train_once_and_sizes_overlay_sits_before_the_row(tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "recipes"
    (recipes / "ablations" / "m" / "t1").mkdir(parents=True)
    (recipes / "ablations" / "m" / "t2").mkdir(parents=True)
    (recipes / "m_synth.yaml").write_text("model:\n  init_args: {a: 1, b: 2}\n")
    (recipes / "ablations" / "m" / "_synthetic.yaml").write_text("trainer: {max_epochs: 2}\n")
    (recipes / "ablations" / "m" / "t1" / "01_base.yaml").write_text("# Base — the recipe\nmodel: {}\n")
    (recipes / "ablations" / "m" / "t1" / "02_b3.yaml").write_text("# B3 — b = 3\nmodel: {init_args: {b: 3}}\n")
    # restates the recipe's value: the same settings as t1/base, written differently
    (recipes / "ablations" / "m" / "t2" / "01_b2.yaml").write_text("# B2 — b = 2\nmodel: {init_args: {b: 2}}\n")
    (recipes / "ablations" / "m" / "t2" / "02_b3.yaml").write_text("# B3 — b = 3\nmodel: {init_args: {b: 3}}\n")
    abl = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs")
    cmd = abl.commands(ablate.discover("m", recipes)["t1"][1], "fit", None)
    configs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--config"]
    assert configs[:3] == [str(recipes / "m_synth.yaml"), str(recipes / "ablations" / "m" / "_synthetic.yaml"),
                           str(recipes / "ablations" / "m" / "t1" / "02_b3.yaml")]
    trained = []

    def fake_train(self, row, same_as=None):  # stands in for fit + test: writes results.json as run_row does
        if same_as is not None:
            return real_run_row(self, row, same_as)
        trained.append(row.key)
        d = self.row_dir(row)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps({"table": row.table, "row": row.name, "order": row.order,
                                                    "metrics": {"test": {"rsum": float(len(trained))}}}))
        return ablate.RowResult(row, "finished", 1.0)
    real_run_row = ablate.Ablation.run_row
    monkeypatch.setattr(ablate.Ablation, "run_row", fake_train)
    results = abl.run(ablate.select(ablate.discover("m", recipes)))
    assert trained == ["t1/base", "t1/b3"]
    assert [r.status for r in results] == ["finished", "finished", "reused", "reused"]
    reused = json.loads((tmp_path / "runs" / "m_synth" / "t2" / "b2" / "results.json").read_text())
    assert reused["same_as"] == "t1/base" and reused["row"] == "b2" and reused["metrics"]["test"]["rsum"] == 1.0
    assert json.loads((tmp_path / "runs" / "m_synth" / "t2" / "b3" / "results.json").read_text())["same_as"] == "t1/b3"
    # different extra lightning arguments are different settings
    assert abl.config_key(ablate.discover("m", recipes)["t1"][0]) != ablate.Ablation(
        "m", "synthetic", recipes, tmp_path / "runs", extra=["--seed_everything", "1"]).config_key(
        ablate.discover("m", recipes)["t1"][0])


def test_malformed_row_blocks_are_errors_naming_the_file(tmp_path):
    cases = {
        "row: {recipe: vsepp, ensemble: [a, b]}\n": "must hold one of",
        "row: {recipes: vsepp}\n": "must hold one of",
        "row: vsepp\n": "must hold one of",
        "row: {recipe: {synthetic: a, flickr: b}}\n": "the datasets are",
        "row: {recipe: 3}\n": "must name a method",
        "row: {ensemble: [a]}\n": "two or more rows",
        "row: {ensemble: [a, b]}\nmodel: {init_args: {lr: 1}}\n": "trains nothing",
        "row: {ensemble: [a, nothere]}\n": "'nothere' is not a trained row of t",
        "row: {ensemble: [a, e]}\n": "'e' is not a trained row of t",
    }
    for k, (text, msg) in enumerate(cases.items()):
        root = tmp_path / str(k)
        _layout(root, {"m/t/01_a.yaml": "# A — a\nmodel: {}\n", "m/t/02_e.yaml": "# E — e\nrow: {ensemble: [a, a]}\n",
                       "m/t/03_bad.yaml": "# Bad — bad\n" + text})
        with pytest.raises(ValueError, match=msg) as e:
            discover("m", root)
        assert "03_bad.yaml" in str(e.value)
    # a per-dataset mapping without this dataset: the run stops before any row, naming file and fix
    root = tmp_path / "perdata"
    _layout(root, {"m/t/01_a.yaml": "# A — a\nrow: {recipe: {f30k: other}}\n"})
    (root / "m_synth.yaml").write_text("model: {}\n")
    row = discover("m", root)["t"][0]
    with pytest.raises(ValueError, match=r"names none for synthetic .*add `synthetic: \.\.\.`"):
        ablate.Ablation("m", "synthetic", root, tmp_path / "runs").base_recipe(row)
    # _table.yaml: a malformed paper mapping is an error naming it
    from zoo.experiments.rows import paper_tables
    (root / "ablations" / "m" / "t" / "_table.yaml").write_text("paper: {flickr: [t2]}\n")
    with pytest.raises(ValueError, match="_table.yaml"):
        paper_tables("m", "t", root)
    (root / "ablations" / "m" / "t" / "_table.yaml").write_text("paper: {f30k: [t2], coco: [t3, t4]}\n")
    assert paper_tables("m", "t", root) == {"synthetic": ["t"], "f30k": ["t2"], "coco": ["t3", "t4"]}
    (root / "ablations" / "m" / "t" / "_table.yaml").write_text("paper: [unclosed\n")
    with pytest.raises(ValueError, match="_table.yaml.*not valid YAML"):
        write_report("m", "synthetic", tmp_path / "runs", root, tmp_path / "nothing")  # not silently dropped


def test_a_row_of_another_recipe_takes_the_tables_data_not_its_model(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    (recipes / "m_synth.yaml").parent.mkdir(parents=True)
    (recipes / "m_synth.yaml").write_text("model:\n  class_path: A\n  init_args: {a: 1}\n")
    (recipes / "other_synth.yaml").write_text("model:\n  class_path: B\n  init_args: {x: 1}\n"
                                             "data:\n  init_args: {n_train: 10, batch_size: 64}\n")
    _layout(recipes, {"m/_synthetic.yaml": "trainer: {max_epochs: 2}\ndata: {init_args: {n_train: 5}}\n"
                                           "model: {init_args: {a: 9}}\n",
                      "m/t/01_own.yaml": "# Own — the method\nmodel: {}\n",
                      "m/t/02_other.yaml": "# Other — another method\nrow: {recipe: other}\n"
                                           "data: {init_args: {batch_size: 4}}\n",
                      "m/t/03_again.yaml": "# Again — the same settings written differently\n"
                                           "data: {init_args: {batch_size: 4}}\nrow: {recipe: {synthetic: other}}\n"})
    abl = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs")
    own, other, again = ablate.discover("m", recipes)["t"]
    cmd = abl.commands(other, "fit", None)
    configs = [Path(cmd[i + 1]) for i, a in enumerate(cmd) if a == "--config"]
    row_dir = tmp_path / "runs" / "m_synth" / "t" / "other"
    assert configs[:3] == [recipes / "other_synth.yaml", row_dir / "ablate_sizes.yaml", row_dir / "ablate_row.yaml"]
    assert yaml.safe_load(configs[1].read_text()) == {"trainer": {"max_epochs": 2}, "data": {"init_args": {"n_train": 5}}}
    assert yaml.safe_load(configs[2].read_text()) == {"data": {"init_args": {"batch_size": 4}}}
    assert "without its model: section" in configs[1].read_text().splitlines()[0]
    # the method's own rows are passed as they are
    cmd = abl.commands(own, "fit", None)
    assert [Path(cmd[i + 1]) for i, a in enumerate(cmd) if a == "--config"][:3] == [
        recipes / "m_synth.yaml", recipes / "ablations" / "m" / "_synthetic.yaml", own.path]
    # the settings: B with x = 1 (not a = 9), the table's n_train, the row's batch; equal rows train once
    key = json.loads(abl.config_key(other))["config"]
    assert key == {"model": {"class_path": "B", "init_args": {"x": 1}}, "trainer": {"max_epochs": 2},
                   "data": {"init_args": {"n_train": 5, "batch_size": 4}}}
    assert abl.config_key(again) == abl.config_key(other) != abl.config_key(own)


def test_a_rows_missing_recipe_stops_the_run_before_any_row_trains(tmp_path, capsys):
    recipes = tmp_path / "recipes"
    _layout(recipes, {"m/t/01_own.yaml": "# Own — own\nmodel: {}\n",
                      "m/t/02_other.yaml": "# Other — other\nrow: {recipe: other}\n"})
    (recipes / "m_f30k.yaml").write_text("model: {}\n")  # no recipes/other_f30k.yaml
    (tmp_path / "f30k").mkdir()
    rc = ablate.main(["m", "f30k", "--recipes", str(recipes), "--runs", str(tmp_path / "runs"), "--logger", "csv",
                      "--", "--data.init_args.root", str(tmp_path / "f30k")])
    err = capsys.readouterr().err
    assert rc == 2 and "no recipe" in err and "other_f30k.yaml" in err
    assert not (tmp_path / "runs" / "m_f30k" / "t" / "own").exists()  # nothing ran


def test_an_ensemble_row_runs_after_its_members_and_reads_their_checkpoints(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    _layout(recipes, {"m/t/01_a.yaml": "# A — a\nmodel: {init_args: {a: 1}}\n",
                      "m/t/02_b.yaml": "# B — b\nmodel: {init_args: {a: 2}}\n",
                      "m/t/03_c.yaml": "# C — c\nmodel: {init_args: {a: 3}}\n",
                      "m/t/04_ab.yaml": "# A+B — mean of a and b\nrow: {ensemble: {synthetic: [b, a], f30k: [a, c]}}\n"})
    (recipes / "m_synth.yaml").write_text("model: {class_path: X}\n")
    abl = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs", extra=["--model.init_args.a", "7",
                                                                               "--seed_everything", "1"])
    a, b, c, ab = ablate.discover("m", recipes)["t"]
    assert [r.name for r in abl.with_members([ab])] == ["b", "a", "ab"]
    assert [r.name for r in abl.with_members([a, ab, b])] == ["a", "b", "ab"]
    calls = []

    def fake_stream(cmd, log, env, use_pty=None):  # the ensemble tool: writes its --json as it would
        calls.append(cmd)
        out = Path(cmd[cmd.index("--json") + 1])
        out.write_text(json.dumps({"ensemble": {"all": {"rsum": 42.0}, "1k": {"rsum": 43.0}}}))
        return 0
    monkeypatch.setattr(ablate, "_stream", fake_stream)
    res = abl.run_row(ab)  # members not finished: a clear failure, nothing run
    assert res.status == "failed" and "member t/b has not finished" in res.message and not calls
    for r in (a, b):
        d = abl.row_dir(r)
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"table": "t", "row": r.name, "settings": abl.settings_digest(r),
                                                    "checkpoint": f"{r.name}.ckpt", "metrics": {"test": {"rsum": 1.0}}}))
    res = abl.run_row(ab)
    assert res.status == "finished", res.message
    cmd = calls[0]
    assert cmd[1:3] == ["-m", "zoo.experiments.ensemble"]
    assert cmd[cmd.index("--ckpt") + 1:cmd.index("--ckpt") + 3] == ["b.ckpt", "a.ckpt"]
    assert "--model.init_args.a" not in cmd and cmd[-2:] == ["--seed_everything", "1"]  # data/trainer extras only
    assert [Path(cmd[i + 1]) for i, x in enumerate(cmd) if x == "--config"] == [recipes / "m_synth.yaml", b.path]
    out = json.loads((abl.row_dir(ab) / "results.json").read_text())
    assert out["metrics"] == {"test": {"rsum": 42.0}, "test_1k": {"rsum": 43.0}}
    assert out["members"] == {"b": "b.ckpt", "a": "a.ckpt"} and out["checkpoint"] is None
    assert abl.run_row(ab).status == "skipped"
    # a member trained again with other settings makes the ensemble's figures stale, never silently reused
    other = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs", extra=["--seed_everything", "2"])
    assert other.finished(ab)[0] == "stale"
    assert [m.name for m in ablate.Ablation("m", "f30k", recipes, tmp_path / "runs").members(ab)] == ["a", "c"]


def test_wandb_mode_choice(monkeypatch):
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(ablate, "_netrc_login", lambda: False)
    assert wandb_setup("csv")[0] is False
    use, env, _ = wandb_setup("wandb")
    assert use and env == {"WANDB_MODE": "offline"}
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(ablate, "_reachable", lambda timeout=3.0: False)
    with pytest.warns(UserWarning, match="unreachable"):
        assert wandb_setup("wandb")[1] == {"WANDB_MODE": "offline"}
    monkeypatch.setattr(ablate, "_reachable", lambda timeout=3.0: True)
    assert wandb_setup("wandb")[1] == {"WANDB_MODE": "online"}
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice stands
    assert wandb_setup("wandb")[1] == {}
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed -> CSV, never a failure
    with pytest.warns(UserWarning, match="wandb unavailable"):
        assert wandb_setup("wandb")[0] is False


# ---- the report -----------------------------------------------------------------------------------------
def _result(run_root, table, row, order, nums, label, what):
    d = run_root / table / row
    d.mkdir(parents=True)
    keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    m = dict(zip(keys, nums), rsum=float(sum(nums)))
    (d / "results.json").write_text(json.dumps({"table": table, "row": row, "order": order, "label": label,
                                                "what": what, "metrics": {"test": m}}))


def _paper(tmp_path, rows: str) -> Path:
    """A paper-figures folder holding m.csv: the header, then `rows`."""
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "m.csv").write_text("table,row,dataset,protocol,i2t_r1,i2t_r5,i2t_r10,t2i_r1,t2i_r5,t2i_r10,rsum,note\n"
                                 + rows)
    return paper


def test_report_from_fixed_runs_matches_the_hand_written_tables(tmp_path):
    _layout(tmp_path / "recipes", {"m/tA/01_x.yaml": "# X — first thing\n", "m/tA/02_y.yaml": "# Y — second\n",
                                   "m/tA/03_z.yaml": "# Z — third\n", "m/tB/01_w.yaml": "# W — fourth\n"})
    runs = tmp_path / "runs"
    _result(runs / "m_synth", "tA", "x", 1, [10, 20, 30, 5, 15, 25], "X", "first thing")
    _result(runs / "m_synth", "tA", "y", 2, [12, 22, 32, 6, 16, 26], "Y", "second")
    _result(runs / "m_synth", "tB", "w", 1, [1, 2, 3, 4, 5, 6], "W", "fourth")
    paper = _paper(tmp_path,
                   "tA,x,f30k,test,60,80,90,40,70,80,420,\n"
                   "tA,y,f30k,test,61,81,91,41,71,81,,recalls only\n"
                   "tA,x,coco,5k,50,70,80,30,60,70,360,\n"
                   "tA,x,coco,1k,70,90,95,50,80,90,475,\n"
                   "tA,y,coco,1k,,,,,,,,\"not printed, empty\"\n")
    paths, rows = write_report("m", "synthetic", runs, tmp_path / "recipes", paper)
    head = ("| row | what it computes | I→T R@1 | R@5 | R@10 | T→I R@1 | R@5 | R@10 | rsum | Δ | paper F30K rsum | Δ "
            "| paper COCO 1K rsum | Δ |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    expected = (
        "# m ablations on SynthScenes: ours beside the paper's\n\n"
        f"Ours: SynthScenes test split, from `{runs / 'm_synth'}`. Paper: `{paper / 'm.csv'}`. "
        "Δ: rsum minus the table's first row (ours beside the paper's).\n"
        "SynthScenes figures are not comparable with the paper's in absolute terms: compare the Δ columns "
        "(the ordering of the rows).\n\n"
        "## tA\n\n" + head +
        "| X | first thing | 10.0 | 20.0 | 30.0 | 5.0 | 15.0 | 25.0 | 105.0 | +0.0 | 420.0 | +0.0 | 475.0 | +0.0 |\n"
        "| Y | second | 12.0 | 22.0 | 32.0 | 6.0 | 16.0 | 26.0 | 114.0 | +9.0 | 426.0 | +6.0 | — | — |\n"
        "| Z (not run) | third | — | — | — | — | — | — | — | — | — | — | — | — |\n\n"
        "Ordering against the paper's F30K rsum (2 rows in both): Kendall τ = 1.00, same best row: yes.\n\n"
        "## tB\n\n" + head +
        "| W | fourth | 1.0 | 2.0 | 3.0 | 4.0 | 5.0 | 6.0 | 21.0 | +0.0 | — | — | — | — |\n")
    assert paths["md"].read_text(encoding="utf-8") == expected
    table = list(csv.DictReader(open(paths["csv"], encoding="utf-8")))
    assert [(r["table"], r["row"], r["status"]) for r in table] == [
        ("tA", "x", "finished"), ("tA", "y", "finished"), ("tA", "z", "not run"), ("tB", "w", "finished")]
    assert table[1]["paper_f30k_rsum"] == "426.00" and table[1]["paper_f30k_t2i_r10"] == "81.00"
    assert table[0]["paper_coco_protocol"] == "1k" and table[0]["paper_coco_i2t_r1"] == "70.00"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    # on the paper's dataset the difference ours - paper is added; a missing paper file leaves cells empty
    _result(runs / "m_f30k", "tA", "x", 1, [10, 20, 30, 5, 15, 25], "X", "first thing")
    paths, _ = write_report("m", "f30k", runs, tmp_path / "recipes", paper)
    assert "| 105.0 | +0.0 | 420.0 | +0.0 | 475.0 | +0.0 | -315.0 |" in paths["md"].read_text(encoding="utf-8")
    with pytest.warns(UserWarning, match="no paper figures"):
        paths, rows = write_report("m", "f30k", runs, tmp_path / "recipes", tmp_path / "nothing")
    assert rows[0]["rsum"] == 105.0 and rows[0]["paper_f30k_rsum"] is None


def test_a_comparison_table_reads_the_paper_tables_its_table_file_names(tmp_path):
    _layout(tmp_path / "recipes", {"m/cmp/01_x.yaml": "# X — x\n", "m/cmp/02_y.yaml": "# Y — y\n",
                                   "m/cmp/_table.yaml": "paper: {f30k: [t2], coco: [t3_1k, t4_5k]}\n"})
    runs = tmp_path / "runs"
    _result(runs / "m_synth", "cmp", "x", 1, [10, 20, 30, 5, 15, 25], "X", "x")
    paper = _paper(tmp_path,
                   "t2,x,f30k,test,60,80,90,40,70,80,420,\n"
                   "cmp,x,f30k,test,1,1,1,1,1,1,6,not the named table\n"
                   "t4_5k,x,coco,5k,50,70,80,30,60,70,360,\n"
                   "t3_1k,x,coco,1k,70,90,95,50,80,90,475,\n"
                   "t4_5k,y,coco,5k,40,60,70,20,50,60,300,only 5K printed\n")
    _, rows = write_report("m", "synthetic", runs, tmp_path / "recipes", paper)
    x, y = rows
    assert (x["paper_f30k_rsum"], x["paper_coco_rsum"], x["paper_coco_protocol"]) == (420.0, 475.0, "1k")
    assert (y["paper_f30k_rsum"], y["paper_coco_rsum"], y["paper_coco_protocol"]) == (None, 300.0, "5k")
    # --tables: only the named tables; an unknown one is an error naming the tables there are
    _layout(tmp_path / "recipes", {"m/other/01_z.yaml": "# Z — z\n"})
    _, rows = write_report("m", "synthetic", runs, tmp_path / "recipes", paper, tables=["cmp"])
    assert [r["row"] for r in rows] == ["x", "y"]
    with pytest.raises(ValueError, match="no table nope for m \\(tables: cmp, other\\)"):
        write_report("m", "synthetic", runs, tmp_path / "recipes", paper, tables=["nope"])


def test_seed_agreement_in_the_report(tmp_path):
    _layout(tmp_path / "recipes", {"m/tA/01_a.yaml": "# A — a\n", "m/tA/02_b.yaml": "# B — b\n",
                                   "m/tA/03_c.yaml": "# C — c\n", "m/tA/04_d.yaml": "# D — d\n"})
    main, other = tmp_path / "runs", tmp_path / "runs_seed1"
    for runs, sums in ((main, [10, 30, 20, 40]), (other, [12, 25, 31, 50])):
        for k, (name, v) in enumerate(zip("abcd", sums), 1):
            _result(runs / "m_synth", "tA", name, k, [v, 0, 0, 0, 0, 0], name.upper(), name)
    # d is the same run as c in the main folder: it must not count twice in the agreement
    res = json.loads((main / "m_synth" / "tA" / "d" / "results.json").read_text())
    res["same_as"] = "tA/c"
    (main / "m_synth" / "tA" / "d" / "results.json").write_text(json.dumps(res))
    paths, rows = write_report("m", "synthetic", main, tmp_path / "recipes", tmp_path / "nothing",
                               seeds=[other])
    assert [r["seed_rsums"] for r in rows] == [[12.0], [25.0], [31.0], [50.0]]
    # a, b, c: main order a < c < b, other order a < b < c -> pairs (a,b) +, (a,c) +, (b,c) - -> tau = 1/3
    assert kendall_tau([10, 30, 20], [12, 25, 31]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0 and kendall_tau([1], [1]) is None
    md = paths["md"].read_text(encoding="utf-8")
    assert "| rsum | rsum, other seeds | Δ |" in md and "| 30.0 | 25.0 | +20.0 |" in md
    assert (f"Ordering against `{other}` (3 rows run in both): Kendall τ = 0.33, same best row: no, "
            "mean |rsum difference| = 6.0.") in md
    assert "against the paper" not in md  # no paper figures here


def test_paper_ordering_agreement(tmp_path):
    """Kendall τ of our rsums against the paper's per table (issue 15: the ablation rows read against Table 6)."""
    from zoo.experiments.report import paper_agreement

    rows = [{"table": "t", "row": r, "rsum": ours, "paper_f30k_rsum": f30k, "paper_coco_rsum": coco, "same_as": sa}
            for r, ours, f30k, coco, sa in [("a", 10, 500, 530, None), ("b", 30, 490, None, None),
                                            ("c", 20, 480, 520, None), ("d", 20, 470, 510, "t/c"),
                                            ("e", None, 460, 500, None)]]
    # f30k over a, b, c (d reuses c's run, e not run): ours b > c > a, paper a > b > c -> (a,b) -, (a,c) -,
    # (b,c) + -> tau = -1/3; coco over a, c: ours c > a, paper a > c -> -1
    f30k, coco = paper_agreement(rows, "t")
    assert f30k == {"dataset": "f30k", "n": 3, "tau": pytest.approx(-1 / 3), "same_best": False}
    assert coco == {"dataset": "coco", "n": 2, "tau": -1.0, "same_best": False}
    assert paper_agreement(rows, "other") == []


# ---- end to end -----------------------------------------------------------------------------------------
def _wandb_records(run_dir: Path):
    """Records of an offline run's .wandb file (LevelDB-log framing of wandb_internal_pb2.Record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf + chunk if kind == 4 else chunk)
            yield rec
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk


def _wandb_run(run_dir: Path) -> dict:
    """{run, config, summary, history} of an offline run, values decoded from JSON."""
    out = {"run": None, "config": {}, "summary": {}, "history": []}
    for rec in _wandb_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.summary.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
    return out


@pytest.mark.slow
def test_two_row_ablation_runs_skips_resumes_logs_and_ensembles(tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "recipes"
    shutil.copy(RECIPES / "casc_base_synth.yaml", tmp_path / "casc_base_synth.yaml")
    (recipes / "ablations").mkdir(parents=True)
    shutil.copy(tmp_path / "casc_base_synth.yaml", recipes / "casc_base_synth.yaml")
    shutil.copytree(RECIPES / "ablations" / "casc_base", recipes / "ablations" / "casc_base")
    (recipes / "ablations" / "casc_base" / "directions" / "03_t2i.yaml").unlink()
    (recipes / "ablations" / "casc_base" / "directions" / "04_broken.yaml").write_text(
        "# Broken — a row whose config is invalid\nmodel:\n  class_path: zoo.methods.CASCBase\n"
        "  init_args: {direction: sideways}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(ablate, "_netrc_login", lambda: False)
    base = ["casc_base", "synthetic", "--recipes", str(recipes), "--paper", str(ROOT / "zoo" / "paper_results")]

    # 1. two rows and a broken one: the broken row is reported, the others finish, the exit code says so
    rc = ablate.main(base + ["--", *SHRINK, "--trainer.max_epochs", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "row 1/3: directions/both" in out and "row 3/3: directions/broken" in out and "remaining ~" in out
    root = tmp_path / "runs" / "ablate" / "casc_base_synth" / "directions"
    res = {r: json.loads((root / r / "results.json").read_text()) for r in ("both", "i2t")}
    assert not (root / "broken" / "results.json").exists()
    for r in res.values():
        assert set(r["metrics"]) == {"test"} and {"i2t_r1", "t2i_r10", "rsum", "mR"} <= set(r["metrics"]["test"])
    assert res["both"]["label"] == "CASC-base"

    # W&B (offline, no key): fit and test of a row are one run (same id), holding config, val history, test summary
    runs = sorted((root / "both" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the fit process and the test process
    fit, test = _wandb_run(runs[0]), _wandb_run(runs[1])
    assert fit["run"].run_id == test["run"].run_id
    assert (fit["run"].project, fit["run"].run_group, fit["run"].display_name) == (
        "itm-zoo-casc_base-synthetic", "directions", "both")
    assert {"casc_base", "synthetic", "directions", "both"} <= set(fit["run"].tags)
    cli = fit["config"]["cli"]
    assert cli["model"]["init_args"]["direction"] == "both" and cli["data"]["init_args"]["n_train"] == 40
    assert cli["trainer"]["max_epochs"] == 1 and fit["config"]["embed_dim"] == 16
    assert any("val/rsum" in h for h in fit["history"])
    assert test["summary"]["test/rsum"] == pytest.approx(res["both"]["metrics"]["test"]["rsum"])
    assert test["summary"]["test/i2t_r1"] == pytest.approx(res["both"]["metrics"]["test"]["i2t_r1"])
    comparison_dir = next((root.parent / "wandb").glob("offline-run-*"))
    comparison = _wandb_run(comparison_dir)  # the W&B Table: our figures beside the paper's, one row per row
    assert comparison["run"].display_name == "comparison"
    assert comparison["summary"]["comparison/_type"] == "table-file"
    assert comparison["summary"]["comparison/nrows"] == 3
    table = json.loads((comparison_dir / "files" / comparison["summary"]["comparison/path"]).read_text())
    by_row = {r[table["columns"].index("row")]: dict(zip(table["columns"], r)) for r in table["data"]}
    assert by_row["both"]["rsum"] == pytest.approx(res["both"]["metrics"]["test"]["rsum"])
    assert by_row["both"]["paper_f30k_rsum"] == pytest.approx(446.5) and by_row["broken"]["status"] == "not run"
    report = (root.parent / "report.md").read_text(encoding="utf-8")
    assert "| CASC-base |" in report and "| I2T only |" in report and "Broken (not run)" in report
    assert f"| {res['i2t']['metrics']['test']['rsum']:.1f} |" in report and "| 446.5 |" in report

    # 2. run again: finished rows are skipped; a row killed after its first epoch resumes from last.ckpt
    for f in ("results.json", ".fit_done"):
        (root / "i2t" / f).unlink()  # i2t now looks killed mid-fit: a checkpoint, no results
    both_mtime = (root / "both" / "results.json").stat().st_mtime
    steps = torch.load(root / "i2t" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    # (other ARGS than the finished row's: it is reported stale, not silently skipped, and the exit code says so)
    rc = ablate.main(base + ["--rows", "both,i2t", "--logger", "CSV", "--", *SHRINK, "--trainer.max_epochs", "2"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "directions/both stale" in out and "finished with other settings" in out
    assert "resuming the killed fit" in out
    assert (root / "both" / "results.json").stat().st_mtime == both_mtime
    ckpt = torch.load(root / "i2t" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * steps  # the second epoch ran ...
    resumed = list(csv.DictReader(open(root / "i2t" / "csv_fit" / "version_1" / "metrics.csv")))
    assert {r["epoch"] for r in resumed if r.get("val/rsum")} == {"1"}  # ... and only it
    assert json.loads((root / "i2t" / "results.json").read_text())["resumed_from"].endswith("last.ckpt")

    # 3. ensemble of the two rows' checkpoints = metrics of the mean of their matrices (slow reference)
    from datamodules.datasets import collate
    from zoo.engine.checkpoints import load_model
    from zoo.experiments.ensemble import build_datamodule, main, similarity_matrix
    from zoo.engine.metrics import retrieval_metrics

    ckpts = [str(root / r / "checkpoints" / "best.ckpt") for r in ("both", "i2t")]
    data_args = DATA_SHRINK
    assert main(["--config", "casc_base_synth.yaml", "--ckpt", *ckpts, "--json", "ens.json", *data_args]) == 0
    got = json.loads(Path("ens.json").read_text())
    dm = build_datamodule(["casc_base_synth.yaml"], data_args)
    ds = dm.dataset("test")
    mats = []
    for c in ckpts:
        model = load_model(c, dm)
        sims = torch.zeros(len(ds), 5 * len(ds), dtype=torch.float64)
        with torch.no_grad():
            enc = []
            for i in range(len(ds)):
                b = collate([ds[i]])
                enc.append((model.encode_images(b), model.encode_captions(b)))
            for i, (img, _) in enumerate(enc):
                for j, (_, cap) in enumerate(enc):
                    for k in range(5):
                        n = int(cap["lengths"][k])
                        one = {"words": cap["words"][k:k + 1, :n], "lengths": cap["lengths"][k:k + 1]}
                        sims[i, 5 * j + k] = model.score(img, one)[0, 0].double()
        mats.append(sims)
        fast = similarity_matrix(model, dm.test_dataloader(), len(ds))
        torch.testing.assert_close(fast.double(), sims, atol=1e-5, rtol=1e-5)
        assert got["models"][c]["all"]["rsum"] == pytest.approx(retrieval_metrics(sims)["rsum"])
    expected = retrieval_metrics((mats[0] + mats[1]) / 2)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"):
        assert got["ensemble"]["all"][k] == pytest.approx(expected[k]), k


@pytest.mark.parametrize("use_pty", [False, True])
def test_row_output_reaches_terminal_and_log(tmp_path, use_pty, capsys):
    """On a terminal the child sees a tty (Lightning's live bar); either way the output is also logged."""
    log = tmp_path / "row.log"
    code = "import sys; print('tty', sys.stdout.isatty()); sys.exit(3)"
    assert ablate._stream([sys.executable, "-c", code], log, {}, use_pty=use_pty) == 3
    assert f"tty {use_pty}" in capsys.readouterr().out and f"tty {use_pty}" in log.read_text()
