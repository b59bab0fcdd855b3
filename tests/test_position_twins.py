"""`make twins` (zoo.experiments.twins): its rows, the commands they run and the report from finished results."""
import json
from pathlib import Path

import pytest

from zoo.experiments import twins

ROOT = Path(__file__).resolve().parents[1]


def test_rows_name_their_methods_and_layer_the_twin_data():
    rows = twins.rows(ROOT / "recipes")
    assert [(r.method, r.name) for r in rows] == [("cccl", "cccl"), ("cccl", "cccl_wo_position"),
                                                  ("casc_base", "casc_base")]
    from zoo.experiments.ablate import merged_config, recipe_for, sizes_for
    for r in rows:
        cfg = merged_config(recipe_for(r.method, "synthetic", ROOT / "recipes"), sizes_for(r.method, "synthetic",
                            ROOT / "recipes"), r.path, ROOT / "recipes" / "position_twins" / "_data.yaml")
        data = cfg["data"]["init_args"]
        assert data["twins"] is True and data["twin_batches"] == 0.5 and data["batch_size"] == 32
        assert (data["n_train"], data["num_regions"], data["root"]) == (800, 18, ".cache/synthscenes_twins")
        assert cfg["model"]["init_args"].get("use_box_position", r.method == "cccl") == (r.name == "cccl")


def test_runner_commands_carry_the_data_epochs_and_seed(tmp_path):
    import argparse
    row = twins.rows(ROOT / "recipes")[0]
    args = argparse.Namespace(recipes=ROOT / "recipes", epochs=4, extra=[], runs=tmp_path, lr_decay_epochs=None,
                              lr_decay=twins.TWIN_LR_DECAY)
    cmd = twins.runner(row, 1, args, False, {}).commands(row, "fit", None)
    assert cmd[cmd.index("--seed_everything") + 1] == "1" and cmd[cmd.index("--trainer.max_epochs") + 1] == "4"
    assert str(ROOT / "recipes" / "position_twins" / "_data.yaml") in cmd
    assert str(tmp_path / "seed1" / "cccl_synth" / "position_twins" / "cccl") in cmd
    assert "--model.init_args.lr_decay_epochs" not in cmd  # the recipes' own schedule unless asked
    args.lr_decay_epochs = 6
    cmd = twins.runner(row, 1, args, False, {}).commands(row, "fit", None)
    assert cmd[cmd.index("--model.init_args.lr_decay_epochs") + 1] == "6"
    # every row gets the twins' decay factor (halving, not the recipes' 0.1), after the recipes so that it wins
    assert cmd[cmd.index("--model.init_args.lr_decay") + 1] == "0.5" == str(twins.TWIN_LR_DECAY)
    assert cmd.index("--model.init_args.lr_decay") > max(i for i, a in enumerate(cmd) if a == "--config")


def test_report_from_finished_results(tmp_path):
    rows = twins.rows(ROOT / "recipes")
    for seed, t2i in ((0, 61.0), (1, 59.0)):
        d = tmp_path / f"seed{seed}" / "cccl_synth" / "position_twins" / "cccl"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"metrics": {"test": {"t2i_r1": t2i, "i2t_r1": 70.0,
                                                                          "rsum": 500.0 + seed}}}))
    table = twins.collect(rows, [0, 1], tmp_path, measure=lambda row, seed, d: {"twin_accuracy": 70.0 + seed})
    md = twins.to_markdown(table, [0, 1], 4)
    assert "| CCCL | 61.0 | 59.0 | 60.0 | 70.0 | 71.0 | 70.5 | 500.0 | 501.0 | 500.5 |" in md
    assert "| CASC-base | — | — | — | — | — | — | — | — | — |" in md
    assert "best checkpoint (selected on val/rsum)" in md
    # the last checkpoint's measurement replaces the best's test metrics (results.json holds the best's)
    last = twins.collect(rows, [0, 1], tmp_path, measure=lambda row, seed, d: {"twin_accuracy": 60.0, "t2i_r1": 1.0,
                                                                                "i2t_r1": 2.0, "rsum": 3.0})
    md = twins.to_markdown(last, [0, 1], 8, "last")
    assert "| CCCL | 1.0 | 1.0 | 1.0 | 60.0 | 60.0 | 60.0 | 3.0 | 3.0 | 3.0 |" in md and "last checkpoint" in md


def test_twin_measurement_cache_follows_its_checkpoint(tmp_path, monkeypatch):
    from zoo.experiments import ensemble

    class Measured(Exception):
        pass

    def build_datamodule(configs, overrides):
        raise Measured(configs)

    monkeypatch.setattr(ensemble, "build_datamodule", build_datamodule)
    row = tmp_path / "row"
    (row / "checkpoints").mkdir(parents=True)
    assert twins.measure_twins(row, [], "last") is None  # not trained: nothing to measure
    ckpt = row / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"x")
    stamp = [ckpt.stat().st_size, ckpt.stat().st_mtime_ns]
    (row / "twins_last.json").write_text(json.dumps({"metrics": {"twin_accuracy": 55.0}, "stamp": stamp,
                                                      "twin_test": None, "version": twins.CACHE_VERSION}))
    assert twins.measure_twins(row, [], "last") == {"twin_accuracy": 55.0}
    with pytest.raises(Measured):  # another twin test size is another measurement
        twins.measure_twins(row, ["r.yaml"], "last", twin_test=2000)
    (row / "twins_last.json").write_text(json.dumps({"metrics": {"twin_accuracy": 55.0}, "stamp": stamp}))
    with pytest.raises(Measured):  # a cache of an older version (no standard errors) is measured again
        twins.measure_twins(row, ["r.yaml"], "last")
    ckpt.write_bytes(b"retrained")  # another checkpoint: the cache is not used, the row is measured again
    with pytest.raises(Measured):
        twins.measure_twins(row, ["r.yaml"], "last")


def test_twin_accuracy_counts_own_image_above_its_twin_and_ties_as_half():
    import torch
    sims = torch.zeros(4, 4)  # 4 images (two twin pairs), 1 caption each
    sims[0, 0], sims[1, 0] = 0.9, 0.1  # caption 0: own image 0 above twin 1
    sims[0, 1], sims[1, 1] = 0.8, 0.2  # caption 1: own image 1 below twin 0
    sims[2, 2] = sims[3, 2] = 0.5      # caption 2: a tie
    sims[3, 3], sims[2, 3] = 0.7, 0.6  # caption 3: own image 3 above twin 2; images of other pairs do not count
    sims[0, 3] = 5.0
    assert twins.twin_stats(*twins.own_and_twin(sims, 1), caps_per_image=1)[0] == 100 * (1 + 0 + 0.5 + 1) / 4


def test_unknown_row_is_an_error(capsys):
    assert twins.main(["--rows", "nope"]) == 2
    assert "no row nope" in capsys.readouterr().err


def test_twin_standard_error_is_clustered_by_twin_pair():
    import math

    import torch
    # 3 twin pairs, 1 caption per image: pair 0 both right, pair 1 both wrong, pair 2 one right and one tie
    own = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    twin = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    acc, se = twins.twin_stats(own, twin, caps_per_image=1)
    pair_means = [1.0, 0.0, 0.75]
    m = sum(pair_means) / 3
    assert acc == 100 * (1 + 1 + 0 + 0 + 1 + 0.5) / 6
    assert math.isclose(se, 100 * math.sqrt(sum((p - m) ** 2 for p in pair_means) / 2 / 3))
    # a binomial error over 6 independent captions would be smaller than the clustered one here
    p = acc / 100
    assert se > 100 * math.sqrt(p * (1 - p) / 6)
    with pytest.raises(ValueError, match="whole twin pairs"):
        twins.twin_stats(own[:5], twin[:5], caps_per_image=1)


def _tiny_twin_row(tmp_path):
    """A CCCL row of `make twins` shrunk to a tiny twin SynthScenes, one training step, its last.ckpt saved."""
    import lightning as L
    import yaml

    from zoo.cli import ZooCLI
    from zoo.engine.module import RetrievalModule
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "data": {"init_args": {"root": str(tmp_path / "ss"), "n_train": 20, "n_dev": 4, "n_test": 4,
                               "feature_dim": 16, "num_regions": 4, "num_workers": 0, "vocab_min_count": 1,
                               "batch_size": 8, "eval_batch_size": 4}},
        "model": {"init_args": {"feature_dim": 16, "embed_dim": 8, "word_dim": 4}}}))
    configs = [str(ROOT / "recipes" / "cccl_synth.yaml"), str(ROOT / "recipes" / "position_twins" / "_data.yaml"),
               str(tiny)]
    cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=[a for c in configs for a in ("--config", c)])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(cli.model, cli.datamodule)
    row = tmp_path / "row"
    (row / "checkpoints").mkdir(parents=True)
    trainer.save_checkpoint(row / "checkpoints" / "last.ckpt")
    return cli, row, configs


def test_pair_by_pair_twin_scores_equal_the_matrix_and_the_twin_test_split(tmp_path, monkeypatch, one_thread):
    import torch

    from zoo.experiments.ensemble import similarity_matrix
    monkeypatch.chdir(tmp_path)  # the twin test split is generated under ./.cache
    cli, row, configs = _tiny_twin_row(tmp_path)
    model, dm = cli.model.eval(), cli.datamodule
    dm.setup("test")
    n, cpi = dm.num_eval_images("test"), dm.caps_per_image
    sims = similarity_matrix(model, dm.test_dataloader(), n, cpi)
    want = twins.own_and_twin(sims, cpi)
    assert want[0].std() > 0  # real, varying scores
    for per_block in (1, 3):
        got = twins.twin_pair_scores(model, dm.test_dataloader(), n, cpi, pairs_per_block=per_block)
        torch.testing.assert_close(got, want)
    # the whole measurement: a twin test split of the rows' own size is the same data, so the same accuracy
    m = twins.measure_twins(row, configs, "last", twin_test=4)
    assert m["twin_test_scenes"] == 4 and m["twin_test_accuracy"] == m["twin_accuracy"]
    assert m["twin_test_se"] == m["twin_accuracy_se"] and "rsum" in m
    assert (tmp_path / ".cache" / "synthscenes_twins_test4").is_dir()
    # cached by checkpoint and twin test size: asking for another size measures again
    assert twins.measure_twins(row, configs, "last", twin_test=4) == m
    assert twins.measure_twins(row, configs, "last", twin_test=8)["twin_test_scenes"] == 8
    # the row's extra arguments (`-- ARGS`) reach both datamodules, before the twin test's own root and size
    import zoo.experiments.ensemble as ensemble
    seen, real = [], ensemble.build_datamodule
    monkeypatch.setattr(ensemble, "build_datamodule", lambda c, o: seen.append(list(o)) or real(c, o))
    extra = ["--data.init_args.eval_batch_size", "2"]
    got = twins.measure_twins(row, configs, "last", twin_test=4, overrides=extra)
    assert seen == [extra, extra + twins.twin_test_overrides(4)] and got["twin_test_accuracy"] == m["twin_accuracy"]


def test_report_shows_standard_errors_and_the_twin_test_columns(tmp_path):
    rows = twins.rows(ROOT / "recipes")
    d = tmp_path / "seed0" / "cccl_synth" / "position_twins" / "cccl"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"metrics": {"test": {"t2i_r1": 61.0, "rsum": 500.0}}}))
    table = twins.collect(rows, [0], tmp_path, measure=lambda row, seed, d: {
        "twin_accuracy": 55.0, "twin_accuracy_se": 1.25, "twin_test_accuracy": 56.0, "twin_test_se": 0.5,
        "twin_test_scenes": 2000})
    md = twins.to_markdown(table, [0], 8, "last")
    assert "| CCCL | 61.0 | 61.0 | 55.0 ± 1.2 | 55.0 | 56.0 ± 0.5 | 56.0 | 500.0 | 500.0 |" in md
    assert "2000-scene twin test split" in md and "| twin test s0 | twin test mean |" in md


def test_t2i_recall_with_ties_split_is_the_mean_over_random_tie_breaks():
    import torch

    from zoo.engine.metrics import retrieval_metrics
    g = torch.Generator().manual_seed(0)
    sims = torch.randint(0, 3, (6, 12), generator=g).double()  # 6 images, 2 captions each: many ties
    sims[:, 0] = sims[1, 0] = 5.0  # caption 0 ties with every image: 1 / 6 for R@1
    draws = []
    for _ in range(1500):  # break the ties with jitter far below every gap, as a random ordering would
        draws.append(retrieval_metrics(sims + 1e-3 * torch.rand(sims.shape, generator=g), 2)["t2i_r1"])
    mc = sum(draws) / len(draws)
    got = twins.t2i_recall_ties_split(sims, 2)
    assert abs(got - mc) < 1.0, (got, mc)
    assert retrieval_metrics(sims, 2)["t2i_r1"] < got  # the zoo's pessimistic ranks count every tie as a miss
    for k in (5,):
        mc_k = sum(retrieval_metrics(sims + 1e-3 * torch.rand(sims.shape, generator=g), 2)["t2i_r5"]
                   for _ in range(1000)) / 1000
        assert abs(twins.t2i_recall_ties_split(sims, 2, k) - mc_k) < 1.5
    untied = torch.rand(6, 12, generator=g)
    assert twins.t2i_recall_ties_split(untied, 2) == retrieval_metrics(untied, 2)["t2i_r1"]


def test_odd_twin_test_size_is_an_error(capsys):
    assert twins.main(["--twin-test", "2001"]) == 2
    assert "--twin-test 2001: give an even number of scenes" in capsys.readouterr().err


def test_lr_decay_epochs_below_one_is_an_error(capsys):
    assert twins.main(["--lr-decay-epochs", "0"]) == 2
    assert "--lr-decay-epochs 0: give a number of epochs, at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("factor", ["0", "1.5", "-0.5"])
def test_lr_decay_outside_zero_one_is_an_error(capsys, factor):
    assert twins.main(["--lr-decay", factor]) == 2
    assert f"--lr-decay {float(factor)}: give a factor in (0, 1]" in capsys.readouterr().err


def test_report_names_the_schedule(tmp_path):
    md = twins.to_markdown([], [0], 8, "last", "Schedule: every row's lr is multiplied by 0.5 every 3 epochs.")
    assert "Schedule: every row's lr is multiplied by 0.5" in md


def test_evaluation_logs_the_twin_accuracy_on_twin_data_only(tmp_path, monkeypatch, one_thread):
    """A test (or validation) run on twin scenes logs the twin accuracy and the tie-split T->I R@1, equal to
    twins.twin_stats on the model's own matrix; on other data neither appears."""
    import lightning as L

    from conftest import fit_and_test_tiny
    from zoo.experiments.ensemble import similarity_matrix
    monkeypatch.chdir(tmp_path)
    cli, _, _ = _tiny_twin_row(tmp_path)
    model, dm = cli.model, cli.datamodule
    assert dm.twins
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, dm, verbose=False)
    got = model.last_metrics["all"]
    sims = similarity_matrix(model.eval(), dm.test_dataloader(), dm.num_eval_images("test"), dm.caps_per_image)
    acc, se = twins.twin_stats(*twins.own_and_twin(sims, dm.caps_per_image), dm.caps_per_image)
    assert (got["twin_accuracy"], got["twin_accuracy_se"]) == pytest.approx((acc, se))
    assert got["t2i_r1_ties_split"] == pytest.approx(twins.t2i_recall_ties_split(sims, dm.caps_per_image))
    assert trainer.callback_metrics["test/twin_accuracy"] == pytest.approx(acc)
    plain = fit_and_test_tiny("casc_base_synth", tmp_path / "plain", train_batches=1)
    assert "twin_accuracy" not in plain.last_metrics["all"] and "rsum" in plain.last_metrics["all"]


def test_branch_share_gives_each_branch_twin_accuracy_on_twin_data(tmp_path, monkeypatch, one_thread):
    from zoo.experiments.ensemble import similarity_matrix
    from zoo.tools.branch_share import branch_share
    monkeypatch.chdir(tmp_path)
    cli, _, _ = _tiny_twin_row(tmp_path)
    model, dm = cli.model.eval(), cli.datamodule
    out = branch_share(model, dm, "test")
    sims = similarity_matrix(model, dm.test_dataloader(), dm.num_eval_images("test"), dm.caps_per_image)
    acc, _ = twins.twin_stats(*twins.own_and_twin(sims, dm.caps_per_image), dm.caps_per_image)
    assert out["F"]["twin_accuracy"] == pytest.approx(acc, abs=0.05)
    assert all(0 <= out[b]["twin_accuracy"] <= 100 for b in model.net.branches)


def test_val_curves_from_the_fit_logs_and_their_table_and_chart(tmp_path):
    """The report's per-epoch validation twin accuracy: read from every CSV version of a row's fit (a resumed fit's
    later value wins), averaged over seeds; epochs without the metric (training-step rows) are skipped."""
    rows = [r for r in twins.rows(ROOT / "recipes") if r.name == "cccl"]
    head = "epoch,step,train/loss,val/t2i_r1_ties_split,val/twin_accuracy\n"
    for seed, logs in ((0, {0: "0,9,0.5,,\n0,9,,30.0,50.0\n1,19,,40.0,60.0\n", 1: "1,19,,41.0,70.0\n"}),
                       (1, {0: "0,9,,20.0,52.0\n1,19,,44.0,80.0\n"})):
        for v, text in logs.items():
            d = tmp_path / f"seed{seed}" / "cccl_synth" / "position_twins" / "cccl" / "csv_fit" / f"version_{v}"
            d.mkdir(parents=True)
            (d / "metrics.csv").write_text(head + text)
    curves = twins.val_curves(rows, [0, 1, 2], tmp_path)  # seed 2 has no logs
    got = {(c["seed"], c["epoch"]): (c["twin_accuracy"], c["t2i_r1_ties_split"]) for c in curves}
    assert got == {(0, 1): (50.0, 30.0), (0, 2): (70.0, 41.0), (1, 1): (52.0, 20.0), (1, 2): (80.0, 44.0)}
    md = twins.curves_markdown(curves)
    assert "| CCCL (2) | twin acc. | 51.0 | 75.0 |" in md and "| CCCL (2) | T→I R@1 | 25.0 | 42.5 |" in md
    assert twins.curves_markdown([]) == ""
    png = twins.curves_chart(curves, tmp_path / "curves.png")
    assert png.stat().st_size > 1000 and twins.curves_chart([], tmp_path / "none.png") is None
