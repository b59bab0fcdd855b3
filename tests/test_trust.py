"""Issue 19 (second round of trustworthy runs): each case here was a silently wrong result, a traceback or a
confusing outcome before; every test failed before its change."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamodules.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"
SYNTH = ["--data.init_args.root", "ss", "--data.init_args.n_train", "20", "--data.init_args.n_dev", "5",
         "--data.init_args.n_test", "5", "--data.init_args.feature_dim", "8", "--data.init_args.num_regions", "3",
         "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
         "--model.init_args.feature_dim", "8", "--model.init_args.embed_dim", "8", "--model.init_args.word_dim", "8"]


def _cli(args, cwd):
    return subprocess.run([str(LIGHTNING), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


# ---- tracebacks -> one line ------------------------------------------------------------------------------
def test_model_argument_error_is_one_cli_line(tmp_path):
    """beta outside [0, 1] was a ValueError inside a ~60-line jsonargparse traceback."""
    out = _cli(["fit", "--config", str(ROOT / "recipes" / "casc_synth.yaml"), "--model.init_args.beta", "2"],
               tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: beta must lie in [0, 1], got 2.0 (raised at zoo/methods/casc.py:" in out.stderr
    assert "Traceback" not in out.stderr and "Union" not in out.stderr


@pytest.mark.parametrize("recipe, args, message", [
    ("casc_synth.yaml", ["--model.init_args.sg_reading", "foo"], "sg_reading must be one of"),
    ("casc_synth.yaml", ["--data.init_args.caps_per_image", "0"], "data.caps_per_image is 0"),
    ("casc_synth.yaml", ["--data.init_args.num_regions", "0"], "data.num_regions is 0"),
    ("casc_base_synth.yaml", ["--data.init_args.n_test", "0"], "data.n_test is 0"),
])
def test_argument_errors_are_one_line_in_process(recipe, args, message, tmp_path, monkeypatch, capsys):
    from zoo.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes" / recipe), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err or message in err.split("error:", 1)[-1], err[-2000:]
    assert "Traceback" not in err


def test_library_errors_keep_their_traceback():
    """Only the zoo's own checks become one line: an error raised elsewhere (a bug) is not hidden."""
    from zoo.engine.errors import one_line_errors
    with pytest.raises(ValueError, match="invalid literal"):
        with one_line_errors():
            int("x")


def test_two_runs_generating_one_synthscenes_root_wait_for_each_other(tmp_path):
    """Generation used to run outside the cache lock: a second fit on the same new root died on the first's
    .tmp. Now it waits for the lock (held here), then finds the copy made."""
    from datamodules.prepare import cache_lock
    root = tmp_path / "ss"
    code = ("from datamodules.synthscenes import SynthScenesDataModule as S; "
            f"dm = S(root={str(root)!r}, n_train=6, n_dev=2, n_test=2, feature_dim=4, num_regions=2, num_workers=0, "
            "vocab_min_count=1); print('ready', flush=True); dm.prepare_data(); print('ok')")
    with cache_lock(root):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(3)  # prepare_data now waits for the lock instead of generating next to the holder
        assert not (root / "train_ims.npy").exists() and proc.poll() is None
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ok" in out, err[-2000:]
    assert "waiting for another" in err and (root / "synthscenes.json").exists()


# ---- model settings given with --ckpt_path (item 8) and a checkpoint of another class ------------------------
def _fake_ckpt(path, class_path="zoo.methods.CASC", **hp):
    import torch
    torch.save({"hyper_parameters": {"_class_path": class_path, "feature_dim": 8, "embed_dim": 8, "word_dim": 8,
                                     "lr": 5e-4, "lambda_t2i": 9.0, **hp}, "state_dict": {}}, path)
    return str(path)


def _main(args, tmp_path, monkeypatch):
    from zoo.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    main(args)


def test_resume_with_other_model_settings_is_refused(tmp_path, monkeypatch, capsys):
    """`fit --ckpt_path ... --model.init_args.embed_dim 64 --model.init_args.lr 0.1` ran with 8 and 5e-4."""
    ckpt = _fake_ckpt(tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as e:
        _main(["fit", "--config", str(ROOT / "recipes" / "casc_synth.yaml"), *SYNTH, "--ckpt_path", ckpt,
               "--model.init_args.embed_dim", "64", "--model.init_args.lr", "0.1"], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "resuming a run with other model settings" in err
    assert "embed_dim: 64 given, 8 in the checkpoint" in err and "lr: 0.1 given, 0.0005 in the checkpoint" in err


def test_evaluating_with_other_model_settings_warns_for_each(tmp_path, monkeypatch):
    ckpt = _fake_ckpt(tmp_path / "best.ckpt")
    with pytest.warns(UserWarning, match=r"lambda_t2i: 1.0 given, 9.0 in the checkpoint\); evaluating with the "
                                         r"checkpoint's") as rec, pytest.raises(BaseException):
        _main(["test", "--config", str(ROOT / "recipes" / "casc_synth.yaml"), *SYNTH, "--ckpt_path", ckpt,
               "--model.init_args.lambda_t2i", "1", "--model.init_args.eval_image_block", "2"], tmp_path,
              monkeypatch)  # the fake checkpoint holds no weights: the run itself fails after the warning
    assert not any("eval_image_block" in str(w.message) for w in rec)  # evaluation settings simply apply


def test_checkpoint_of_another_class_names_both(tmp_path, monkeypatch, capsys):
    ckpt = _fake_ckpt(tmp_path / "casc.ckpt")
    with pytest.raises(SystemExit):
        _main(["test", "--config", str(ROOT / "recipes" / "cccl_synth.yaml"), *SYNTH, "--ckpt_path", ckpt],
              tmp_path, monkeypatch)
    assert "this is a zoo.methods.CASC checkpoint, the recipe's model is zoo.methods.CCCL" in capsys.readouterr().err


# ---- ensembles and pictures from tiny checkpoints ----------------------------------------------------------
TINY = ["--data.init_args.n_train", "20", "--data.init_args.n_dev", "4", "--data.init_args.n_test", "4",
        "--data.init_args.feature_dim", "16", "--data.init_args.num_regions", "5", "--data.init_args.num_workers",
        "0", "--data.init_args.vocab_min_count", "1", "--data.init_args.batch_size", "8",
        "--data.init_args.eval_batch_size", "4"]


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """Two CASC checkpoints (one training step each) on a tiny SynthScenes with 3 captions per image."""
    import lightning as L

    from zoo.cli import ZooCLI
    from zoo.engine.module import RetrievalModule
    base = tmp_path_factory.mktemp("trust")
    root = base / "ss"
    out = []
    for seed in (0, 1):
        L.seed_everything(seed)
        cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                     args=["--config", str(ROOT / "recipes" / "casc_synth.yaml"), "--data.init_args.root", str(root),
                           *TINY, "--data.init_args.caps_per_image", "3", "--model.init_args.feature_dim", "16",
                           "--model.init_args.embed_dim", "8", "--model.init_args.word_dim", "4",
                           "--model.init_args.label_hidden", "8"])
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(cli.model, cli.datamodule)
        ckpt = base / f"casc{seed}.ckpt"
        trainer.save_checkpoint(ckpt)
        out.append(str(ckpt))
    return root, out


def _ensemble(tiny_ckpts, tmp_path, *extra):
    from zoo.experiments.ensemble import main
    root, ckpts = tiny_ckpts
    js = tmp_path / "e.json"
    main(["--config", str(ROOT / "recipes" / "casc_synth.yaml"), "--ckpt", *ckpts, "--json", str(js),
          "--data.init_args.root", str(root), *TINY, "--data.init_args.caps_per_image", "3", *extra])
    import json
    return json.loads(js.read_text())


def test_ensemble_applies_evaluation_arguments_and_refuses_others(tiny_ckpts, tmp_path, monkeypatch, capsys,
                                                                   one_thread):
    """`--model.init_args.beta 0.2` was ignored (the beta = 0.8 figure was reported)."""
    from zoo.engine.checkpoints import load_model
    from zoo.engine.metrics import all_metrics
    from zoo.experiments.ensemble import build_datamodule, similarity_matrix
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    got = _ensemble(tiny_ckpts, tmp_path, "--model.init_args.beta", "0.0")
    root, ckpts = tiny_ckpts
    dm = build_datamodule([str(ROOT / "recipes" / "casc_synth.yaml")],
                          ["--data.init_args.root", str(root), *TINY, "--data.init_args.caps_per_image", "3"])
    model = load_model(ckpts[0], dm)
    model.beta = 0.0  # S = S_G alone (Eq. 13)
    want = all_metrics(similarity_matrix(model, dm.test_dataloader(), 4, 3), 3, None)
    assert got["models"][ckpts[0]]["all"] == pytest.approx(want["all"])
    model.beta = 0.8
    default = all_metrics(similarity_matrix(model, dm.test_dataloader(), 4, 3), 3, None)
    assert default["all"] != want["all"]  # the two betas give other figures here (meanr at least)
    assert got["settings"]["model_args"] == {"beta": 0.0}
    with pytest.raises(SystemExit):
        _ensemble(tiny_ckpts, tmp_path, "--model.init_args.embed_dim", "64")
    err = capsys.readouterr().err
    assert "embed_dim is not an evaluation argument of CASC" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--weights", "1"], "1 weights for 2 checkpoints"),
    (["--weights", "1", "-1"], "weights must be >= 0 and sum to more than 0"),
    (["--weights", "0", "0"], "weights must be >= 0 and sum to more than 0"),
    (["--model.init_args.beta", "2"], "beta must lie in [0, 1]"),
])
def test_ensemble_argument_errors_before_scoring(tiny_ckpts, tmp_path, monkeypatch, capsys, extra, message):
    """Weights summing to 0 were reported as a NaN model; a count mismatch failed after scoring."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        _ensemble(tiny_ckpts, tmp_path, *extra)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_ensemble_missing_checkpoint_is_one_line(tiny_ckpts, tmp_path, capsys):
    from zoo.experiments.ensemble import main
    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "recipes" / "casc_synth.yaml"), "--ckpt", tiny_ckpts[1][0],
              str(tmp_path / "nope.ckpt")])
    err = capsys.readouterr().err
    assert "nope.ckpt: checkpoint not found" in err and "Traceback" not in err


def test_ensemble_zscore_normalisation_equalises_scales():
    """Raw averaging lets the model with the wider score range decide; z-scores weigh both equally."""
    import torch

    from zoo.experiments.ensemble import ensemble_metrics, normalise
    torch.manual_seed(0)
    a = torch.randn(4, 4) * 100  # wide range
    b = torch.eye(4) * 0.01 + 0.48  # a sigmoid scorer's narrow range, perfect ranking
    raw = ensemble_metrics([a, b], caps_per_image=1)["all"]["rsum"]
    z = ensemble_metrics([a, b], caps_per_image=1, how="zscore")["all"]["rsum"]
    assert ensemble_metrics([a], caps_per_image=1)["all"]["rsum"] == raw  # b drowned
    assert z > raw
    n = normalise(a, "zscore")
    assert abs(float(n.mean())) < 1e-9 and abs(float(n.std()) - 1) < 1e-9
    assert torch.equal(n.argsort(1), a.double().argsort(1)) and torch.equal(n.argsort(0), a.double().argsort(0))


@pytest.mark.parametrize("args, message", [
    (["--image", "99"], "--image 99: the split has images 0..3"),
    (["--caption", "7"], "--caption 7: image 0 has captions 0..2"),
])
def test_pictures_bad_items_are_one_line_and_use_the_checkpoints_captions_per_image(tiny_ckpts, tmp_path, capsys,
                                                                                   args, message):
    """pictures assumed 5 captions per image (this checkpoint has 3: captions would belong to other images)."""
    from zoo.tools import pictures
    root, ckpts = tiny_ckpts
    with pytest.raises(SystemExit):
        pictures.main(["attention", "--ckpt", ckpts[0], "--root", str(root), "--out", str(tmp_path / "a.png"),
                       *args])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_pictures_context_on_a_casc_checkpoint_is_one_line(tiny_ckpts, tmp_path, capsys):
    from zoo.tools import pictures
    root, ckpts = tiny_ckpts
    with pytest.raises(SystemExit):
        pictures.main(["context", "--ckpt", ckpts[0], "--root", str(root), "--out", str(tmp_path / "a.png")])
    assert "CASC has no context-perceived cell" in capsys.readouterr().err
    pictures.main(["attention", "--ckpt", ckpts[0], "--root", str(root), "--out", str(tmp_path / "a.png"),
                   "--caption", "2"])
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


# ---- zoo.report -------------------------------------------------------------------------------------------
def _res(d, rsum, **names):
    import json
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps({**names, "metrics": {"test": {"rsum": rsum}}}))


def test_report_keys_results_by_folder_and_flags_copies(tmp_path):
    """A copied row folder with an edited copy (rsum 999) silently replaced the real row."""
    from zoo.experiments.report import load_results
    root = tmp_path / "runs" / "m_synth"
    _res(root / "tA" / "x", 100.0, table="tA", row="x")
    _res(root / "tA" / "x_copy", 999.0, table="tA", row="x")  # a copied folder, names unchanged
    with pytest.warns(UserWarning) as rec:
        got = load_results("m", "synthetic", tmp_path / "runs")
    assert got[("tA", "x")]["metrics"]["test"]["rsum"] == 100.0
    assert got[("tA", "x_copy")]["metrics"]["test"]["rsum"] == 999.0
    text = " ".join(str(w.message) for w in rec)
    assert "names row tA/x but lies in tA/x_copy" in text and "2 results.json name row tA/x" in text


@pytest.mark.parametrize("content", ["[]", '{"metrics": {"test": {"rsum": "abc"}}}', '{"metrics": {"te',
                                     '{"metrics": []}'])
def test_report_skips_malformed_results_with_a_warning(tmp_path, content):
    from zoo.experiments.report import load_results
    d = tmp_path / "runs" / "m_synth" / "tA" / "x"
    d.mkdir(parents=True)
    (d / "results.json").write_text(content)
    with pytest.warns(UserWarning, match="skipping"):
        assert load_results("m", "synthetic", tmp_path / "runs") == {}


def test_report_seeds_on_a_missing_folder_is_an_error(tmp_path, capsys):
    """--seeds on a missing folder added an empty column."""
    from zoo.experiments.report import main
    _res(tmp_path / "runs" / "m_synth" / "tA" / "x", 100.0)
    assert main(["m", "synthetic", "--runs", str(tmp_path / "runs"), "--recipes", str(tmp_path),
                 "--seeds", str(tmp_path / "nope")]) == 2
    assert "--seeds" in capsys.readouterr().err


# ---- zoo.ablate -------------------------------------------------------------------------------------------
def _rows(tmp_path, files):
    recipes = tmp_path / "recipes"
    (recipes / "ablations" / "m" / "t1").mkdir(parents=True)
    (recipes / "m_synth.yaml").write_text("model:\n  init_args: {a: 1}\n")
    for name, text in files.items():
        (recipes / "ablations" / "m" / "t1" / name).write_text(text)
    return recipes


@pytest.mark.parametrize("text, message", [("# X — x\nmodel: {init_args: [1\n", r"not valid YAML \(line 3\): expected"),
                                           ("# X — x\n- a\n- b\n", "holds a YAML list, not a mapping")])
def test_row_yaml_errors_name_the_file(tmp_path, text, message):
    from zoo.experiments import ablate
    recipes = _rows(tmp_path, {"01_x.yaml": text})
    abl = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs")
    with pytest.raises(DataError, match=message) as e:
        abl.config_key(ablate.discover("m", recipes)["t1"][0])
    assert "01_x.yaml" in str(e.value)


def _fake_train(trained):
    import json

    from zoo.experiments import ablate

    def run_locked(self, row, same_as=None):
        trained.append(row.key)
        (self.row_dir(row) / "results.json").write_text(json.dumps(
            {"settings": self.settings_digest(row), "metrics": {"test": {"rsum": 1.0}}}))
        return ablate.RowResult(row, "finished", 1.0)
    return run_locked


def test_results_record_their_settings_and_truncated_ones_rerun(tmp_path, monkeypatch):
    """A rerun with other ARGS skipped the row silently; a truncated results.json counted as finished."""
    from zoo.experiments import ablate
    recipes = _rows(tmp_path, {"01_x.yaml": "# X — x\nmodel: {init_args: {a: 2}}\n"})
    trained = []
    monkeypatch.setattr(ablate.Ablation, "_run_row_locked", _fake_train(trained))
    row = ablate.discover("m", recipes)["t1"][0]
    abl = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs")
    assert abl.run_row(row).status == "finished" and trained == ["t1/x"]
    assert abl.run_row(row).status == "skipped"
    other = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs", extra=["--trainer.max_epochs", "1"])
    res = other.run_row(row)
    assert res.status == "stale" and "finished with other settings" in res.message and trained == ["t1/x"]
    (abl.row_dir(row) / "results.json").write_text('{"metrics": {"te')  # killed while writing (or copied short)
    with pytest.warns(UserWarning, match="truncated or malformed"):
        assert abl.run_row(row).status == "finished"
    assert trained == ["t1/x", "t1/x"]


def test_two_runners_do_not_train_one_row(tmp_path, monkeypatch):
    import fcntl

    from zoo.experiments import ablate
    recipes = _rows(tmp_path, {"01_x.yaml": "# X — x\n"})
    trained = []
    monkeypatch.setattr(ablate.Ablation, "_run_row_locked", _fake_train(trained))
    row = ablate.discover("m", recipes)["t1"][0]
    abl = ablate.Ablation("m", "synthetic", recipes, tmp_path / "runs")
    abl.row_dir(row).mkdir(parents=True)
    with open(abl.row_dir(row) / ".ablate.lock", "a+") as other:  # another runner holds the row
        fcntl.flock(other, fcntl.LOCK_EX)
        res = subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from zoo.experiments import ablate; "
            f"a = ablate.Ablation('m', 'synthetic', Path({str(recipes)!r}), Path({str(tmp_path / 'runs')!r})); "
            "r = a.run_row(ablate.discover('m', a.recipes)['t1'][0]); print(r.status)")],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "busy", res.stderr[-2000:]
    assert abl.run_row(row).status == "finished" and trained == ["t1/x"]


@pytest.mark.parametrize("args, message", [(["--rows", ","], "names no row"),
                                           (["--runs", "FILE"], "is a file, not a folder"),
                                           (["--logger", "tensorboard"], "invalid choice")])
def test_ablate_argument_errors(tmp_path, monkeypatch, capsys, args, message):
    """`--rows ,` ran nothing and still wrote a report and a W&B comparison run."""
    from zoo.experiments import ablate
    recipes = _rows(tmp_path, {"01_x.yaml": "# X — x\n"})
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    with pytest.raises(SystemExit) if "invalid" in message else _nothing():
        assert ablate.main(["m", "synthetic", "--recipes", str(recipes), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_read_only_runs_folder_is_refused_before_any_row(tmp_path, monkeypatch, capsys):
    """A read-only --runs: tests run as root, for whom chmod does not bite, so os.access is what says read-only."""
    from zoo.experiments import ablate
    recipes = _rows(tmp_path, {"01_x.yaml": "# X — x\n"})
    (tmp_path / "ro").mkdir()
    real = ablate.os.access
    monkeypatch.setattr(ablate.os, "access", lambda path, mode: False if Path(path) == tmp_path / "ro" else
                        real(path, mode))
    assert ablate.main(["m", "synthetic", "--recipes", str(recipes), "--runs", str(tmp_path / "ro" / "runs")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and str(tmp_path / "ro") in err and "--runs" in err
    assert not (tmp_path / "ro" / "runs").exists()


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def test_logger_is_case_insensitive(monkeypatch):
    """LOGGER=CSV silently meant W&B."""
    from zoo.experiments import ablate
    monkeypatch.setenv("LOGGER", "CSV")
    seen = {}

    def wandb_setup(logger):  # stops main right after the choice
        seen["logger"] = logger
        raise SystemExit(0)
    monkeypatch.setattr(ablate, "wandb_setup", wandb_setup)
    with pytest.raises(SystemExit):
        ablate.main(["casc_base", "synthetic", "--rows", "both"])
    assert seen["logger"] == "csv"


def test_wandb_mode_bogus_or_online_without_key_falls_back_to_offline(monkeypatch):
    from zoo.experiments import ablate
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(ablate, "_netrc_login", lambda: False)
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.warns(UserWarning, match="WANDB_MODE='bogus' is not one of"):
        assert ablate.wandb_setup("wandb")[1] == {"WANDB_MODE": "offline"}
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.warns(UserWarning, match="no W&B API key"):
        assert ablate.wandb_setup("wandb")[1] == {"WANDB_MODE": "offline"}


# ---- evaluation warnings ----------------------------------------------------------------------------------
def _tiny_test(root, model, one_thread=None):
    import lightning as L

    from datamodules import PrecompDataModule
    dm = PrecompDataModule(str(root), num_regions=4, feature_dim=8, num_workers=0, vocab_min_count=1,
                           val_max_images=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    return trainer.test(model, dm, verbose=False)[0]


def test_single_image_split_warns(tmp_path, one_thread):
    """A split with a single image gave rsum 600 without a word."""
    from conftest import write_split

    from zoo.methods import CASCBase
    root = tmp_path / "d"
    write_split(root, "train", n_images=6)
    write_split(root, "dev", n_images=1)
    write_split(root, "test", n_images=1)
    with pytest.warns(UserWarning, match=r"single image.*\(rsum 600\) by construction"):
        out = _tiny_test(root, CASCBase(feature_dim=8, embed_dim=8, word_dim=4, fold_size=None))
    assert out["test/rsum"] == 600.0


def test_beta_sweep_range_and_one_term_note(tiny_data, one_thread):
    """beta_sweep values were not range-checked (test_beta-1/rsum was logged); a sweep over a score without
    S_G showed the same figures for every beta without a note."""
    from zoo.methods import CASC
    with pytest.raises(ValueError, match=r"beta_sweep values must lie in \[0, 1\], got \[-1.0\]"):
        CASC(beta_sweep=[0.5, -1.0])
    model = CASC(feature_dim=8, embed_dim=8, word_dim=4, global_branch="none", beta_sweep=[0.0, 1.0], fold_size=None)
    with pytest.warns(UserWarning, match=r"without S_G \(global_branch: none\).*every beta gives the same"):
        out = _tiny_test(tiny_data, model)
    assert out["test_beta0/rsum"] == out["test_beta1/rsum"]


def test_openmp_threads_sleep_by_default_in_zoo_commands():
    """Training and evaluation spun at OpenMP barriers (make demo: 5x slower for a 2x share of the cores);
    `make bench` alone set OMP_WAIT_POLICY=PASSIVE. zoo sets it before torch loads unless the user chose."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import zoo, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"  # the user's choice stands


def test_a_re_exported_class_path_is_the_same_class():
    """An imported checkpoint stores `zoo.methods.sgraf.SGRAF`, the recipes say `zoo.methods.SGRAF`: one class."""
    from zoo.cli import _same_class
    assert _same_class("zoo.methods.sgraf.SGRAF", "zoo.methods.SGRAF")
    assert _same_class("zoo.methods.casc.CASC", "zoo.methods.CASC")
    assert not _same_class("zoo.methods.casc.CASC", "zoo.methods.CASCBase")
    assert not _same_class("no.such.Module", "zoo.methods.CASC")


@pytest.mark.parametrize("name, kwargs", [
    ("CASCBase", {}), ("VSEPP", {}), ("SGRAF", {}), ("DAN", {"hidden_dim": 3}), ("SMLSTM", {"hidden_dim": 3}),
    ("CCCL", {"text_encoder": "bigru"})])
def test_another_vocabulary_size_is_refused_naming_the_file(name, kwargs, tmp_path):
    """Every word-level text encoder (RetrievalModule.size_word_embedding): data whose vocabulary has another size
    than the model's embedding is a DataError naming the vocabulary file and the fix."""
    from types import SimpleNamespace

    import zoo.methods as methods
    from datamodules.errors import DataError

    cls = getattr(methods, name)
    model = cls(vocab_size=7, feature_dim=6, embed_dim=4, word_dim=3, **kwargs)
    vocab = tmp_path / "vocab.json"
    with pytest.raises(DataError, match="the model's vocabulary has 7 words but this one has 9") as e:
        model.configure_from_data(SimpleNamespace(vocab_size=9, vocab_path=vocab, with_boxes=True))
    assert str(vocab) in str(e.value) and "trained with" in str(e.value)


def test_a_hub_name_that_cannot_resolve_fails_at_once(monkeypatch, tmp_path):
    """A BERT name not cached, with the hub unreachable, took ~32 s of the hub client's retries to fail: now the
    hub is probed once and from_pretrained is never called; a local folder is used as given."""
    import transformers

    from datamodules import hub
    from zoo.methods import CCCL

    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: pytest.fail("from_pretrained was called")))
    with pytest.raises(ValueError, match="'no-such-org/no-such-bert' is not a local folder nor in the hub cache, "
                                         "and the hub cannot be reached"):
        CCCL(text_encoder="bert", bert_model="no-such-org/no-such-bert")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        hub.resolve_pretrained("no-such-org/no-such-bert")
    assert hub.resolve_pretrained(str(tmp_path)) == str(tmp_path)
