"""The report: table and metrics computed from per-fold evaluation files, plots written as PNG."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from fssmeta.data.io import DataError
from fssmeta.params import load_config
from fssmeta.report import (
    markdown_table,
    metrics,
    plot_per_class,
    plot_training_curves,
    stages_markdown,
    sweep_markdown,
    write_report,
)


def fake_eval(root, fold, method, mious):
    seeds = [{"seed": s, "miou": m, "fb_iou": 0.5 + m / 2, "episodes": 10, "per_class": {str(5 * fold + 1): m}}
             for s, m in enumerate(mious)]
    mean = sum(mious) / len(mious)
    std = (sum((m - mean) ** 2 for m in mious) / len(mious)) ** 0.5
    report = {"method": method, "protocol": {"dataset": "synthetic", "resolution": "original"},
              "results": {f"fold{fold}": {"1shot": {"miou_mean": mean, "miou_std": std, "fbiou_mean": 0.5 + mean / 2,
                                                    "fbiou_std": 0.0, "seeds": seeds}}}}
    path = root / f"fold{fold}" / f"{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))


@pytest.fixture
def cfg(tmp_path):
    for fold in (0, 1):
        fake_eval(tmp_path / "results", fold, "bam", [0.5 + 0.1 * fold, 0.7 + 0.1 * fold])
        fake_eval(tmp_path / "results", fold, "baseline", [0.3, 0.3])
    return load_config(None, {"eval.out": str(tmp_path / "results"), "eval.folds": [0, 1], "eval.shots": [1],
                              "report.out": str(tmp_path / "report")})


def test_metrics_and_table(cfg):
    from fssmeta.report import collect

    collected = collect(cfg, ["bam", "baseline"])
    table = metrics(collected, (1,))
    assert table["bam"]["1shot"]["miou"] == pytest.approx((0.6 + 0.7) / 2)
    assert table["bam"]["1shot"]["fold1"]["miou_std"] == pytest.approx(0.1)
    text = markdown_table(collected, (1,))
    assert "| bam | 1 | 60.0 ± 10.0 | 70.0 ± 10.0 | **65.0** |" in text
    assert "| baseline | 1 | 30.0 ± 0.0 | 30.0 ± 0.0 | **30.0** |" in text
    assert "Protocol: dataset=synthetic, resolution=original" in text


def test_write_report_without_a_model(cfg, tmp_path):
    histories = {"fold0 1-shot": [{"epoch": 1, "train_loss": 1.0, "val_miou": 0.2},
                                  {"epoch": 2, "train_loss": 0.5, "val_miou": 0.4}]}
    write_report(cfg, tmp_path / "report", ["bam", "baseline"], histories, qualitative_model=None)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["protocol"]["dataset"] == "synthetic" and saved["bam"]["1shot"]["miou"] == pytest.approx(0.65)
    for name in ("training_curves.png", "per_class_iou.png"):
        with Image.open(tmp_path / "report" / "plots" / name) as img:
            assert img.format == "PNG" and img.width > 300


def test_missing_evaluation_names_the_file(cfg, tmp_path):
    (tmp_path / "results" / "fold1" / "baseline.json").unlink()
    with pytest.raises(DataError, match=r"fold1/baseline.json: evaluation of baseline \(run the evaluate stage\) not found"):
        write_report(cfg, tmp_path / "report", ["bam", "baseline"], {}, None)


def test_plots_are_images(tmp_path):
    plot_training_curves({"a": [{"epoch": 1, "train_loss": 1.0}]}, tmp_path / "c.png")
    collected = {"m": {"results": {"fold0": {"1shot": {"seeds": [{"per_class": {"1": 0.5, "2": 0.25}}]}}}}}
    plot_per_class(collected, 1, ("one", "two"), tmp_path / "p.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "p.png").stat().st_size > 1000


def fake_targets(root, method, gray, tiles, suffix="", split="all"):
    def entry(m):
        return {"miou_mean": m, "miou_std": 0.01, "fbiou_mean": m, "fbiou_std": 0.0, "seeds": []}

    report = {"method": method, "source_fold": split, "protocol": {"resolution": "resized", "size": 400},
              "results": {"gray": {"1shot": entry(gray)}, "tiles": {"1shot": entry(tiles)}},
              "mean_over_targets": {"1shot": (gray + tiles) / 2}}
    path = (root / "targets" / f"{method}-all{suffix}.json" if split == "all"
            else root / f"fold{split}" / "targets" / f"{method}{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))


def test_cross_domain_section_and_metrics(cfg, tmp_path):
    write_report(cfg, tmp_path / "report", ["bam", "baseline"], {}, None)
    assert "Cross-domain" not in (tmp_path / "report" / "report.md").read_text()  # no targets evaluated
    fake_targets(tmp_path / "results", "bam", 0.4, 0.2)
    fake_targets(tmp_path / "results", "baseline", 0.3, 0.1)
    table = write_report(cfg, tmp_path / "report", ["bam", "baseline"], {}, None)
    assert table["cross_domain"]["bam"]["1shot"] == pytest.approx({"mean": 0.3, "gray": 0.4, "tiles": 0.2})
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["cross_domain"]["baseline"]["1shot"]["mean"] == pytest.approx(0.2)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Cross-domain (PATNet protocol)" in text
    assert "| bam | 1 | 40.0 ± 1.0 | 20.0 ± 1.0 | **30.0** |" in text
    # the tta regime is its own row (and metrics key), read only for the regimes eval.target_regimes lists
    fake_targets(tmp_path / "results", "bam", 0.6, 0.4, suffix="-tta")
    assert "bam+tta" not in write_report(cfg, tmp_path / "report", ["bam", "baseline"], {}, None)["cross_domain"]
    both = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"target_regimes": ("none", "tta")})})
    table = write_report(both, tmp_path / "report", ["bam", "baseline"], {}, None)
    assert table["cross_domain"]["bam+tta"]["1shot"]["mean"] == pytest.approx(0.5)
    assert table["cross_domain"]["bam"]["1shot"]["mean"] == pytest.approx(0.3)
    assert "| bam+tta | 1 | 60.0 ± 1.0 | 40.0 ± 1.0 | **50.0** |" in (tmp_path / "report" / "report.md").read_text()
    assert "Source: one model on every source class" in (tmp_path / "report" / "report.md").read_text()


def test_cross_domain_source_splits_and_fold(cfg, tmp_path):
    # fold 0's and fold 1's models on the targets: `fold` reads eval.target_fold's file, `splits` the mean
    # (and spread) over every eval.folds file; the all-classes model's file is then not read
    fake_targets(tmp_path / "results", "bam", 0.9, 0.9)
    fake_targets(tmp_path / "results", "bam", 0.4, 0.2, split=0)
    one = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"target_source": "fold", "target_fold": 0})})
    assert write_report(one, tmp_path / "report", ["bam"], {}, None)["cross_domain"]["bam"]["1shot"]["mean"] == pytest.approx(0.3)
    splits = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"target_source": "splits"})})
    assert "cross_domain" not in write_report(splits, tmp_path / "report", ["bam"], {}, None)  # fold 1 missing
    fake_targets(tmp_path / "results", "bam", 0.6, 0.0, split=1)
    table = write_report(splits, tmp_path / "report", ["bam"], {}, None)["cross_domain"]["bam"]["1shot"]
    assert table == pytest.approx({"mean": 0.3, "gray": 0.5, "tiles": 0.1})
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| bam | 1 | 50.0 ± 10.0 | 10.0 ± 10.0 | **30.0** |" in text  # std over the two splits
    assert "Source: every split's model, mean of fold0, fold1" in text


def test_target_stage_without_targets_records_why(tmp_path, monkeypatch):
    from pipelines import evaluate_targets

    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{targets: {{}}}}\neval: {{out: {tmp_path / 'results'}}}\n")
    monkeypatch.setattr("sys.argv", ["evaluate_targets", "--params", str(params)])
    evaluate_targets.main()
    saved = json.loads((tmp_path / "results" / "targets" / "none.json").read_text())
    assert saved == {"targets": {}, "reason": "data.targets is empty in params"}


def test_ablation_table_and_report_section(cfg, tmp_path):
    from fssmeta.report import ABLATION_VARIANTS, ablation_markdown

    assert list(ABLATION_VARIANTS) == ["bam", "bam+memory", "bam+mining", "flagship", "ntrenet", "hdmnet", "sccan",
                                       "hsnet", "hsnet+hm", "asnet", "asnet+hm"]
    hybrid = cfg.model.model_copy(update=ABLATION_VARIANTS["asnet+hm"](cfg.model))
    assert (hybrid.method, hybrid.options("asnet")["support_masking"], hybrid.memory.enabled) == ("asnet", "hybrid", False)
    assert hybrid.options("asnet")["support_size"] == cfg.model.options("asnet")["support_size"]  # the others kept
    hsnet = cfg.model.model_copy(update=ABLATION_VARIANTS["hsnet"](cfg.model))
    assert hsnet.options("hsnet")["support_masking"] == "feature"
    flagship = cfg.model.model_copy(update=ABLATION_VARIANTS["flagship"](cfg.model))
    assert flagship.method == "bam" and flagship.memory.enabled and flagship.mining.enabled
    assert not cfg.model.model_copy(update=ABLATION_VARIANTS["ntrenet"](cfg.model)).memory.enabled
    results = {"source_fold": 0, "shots": [1], "seeds": [0, 1], "test_seeds": [0, 1], "episodes_per_list": 100,
               "machine": "test box", "train": {"epochs": 5}, "tta": {"steps": 20}, "variants": {
                   "bam": {"runs": {
                       "0": {"in_domain": {"1shot": 0.5}, "targets": {"none": {"gray": {"1shot": 0.2}, "hazy": {"1shot": 0.4}},
                                                                     "tta": {"gray": {"1shot": 0.5}, "hazy": {"1shot": 0.7}}}},
                       "1": {"in_domain": {"1shot": 0.6}, "targets": {"none": {"gray": {"1shot": 0.4}, "hazy": {"1shot": 0.4}},
                                                                     "tta": {"gray": {"1shot": 0.5}, "hazy": {"1shot": 0.5}}}}}},
                   "flagship": {"runs": {"0": {"in_domain": {"1shot": 0.55}, "targets": {}}}}},
               "baseline": {"in_domain": {"1shot": 0.3}, "targets": {"none": {"gray": {"1shot": 0.1}, "hazy": {"1shot": 0.3}}}}}
    text = ablation_markdown(results)
    # mean ± population std over the two training seeds; the target mean is per seed, then spread
    assert "| bam | 1 | 2 | 55.0 ± 5.0 | 30.0 ± 10.0 | 40.0 ± 0.0 | **35.0 ± 5.0** |" in text
    assert "| bam+tta | 1 | 2 | — | 50.0 ± 0.0 | 60.0 ± 10.0 | **55.0 ± 5.0** |" in text  # its own row
    assert "| flagship | 1 | 1 | 55.0 ± 0.0 | — | — | — |" in text and "test box" in text
    rescored = {**results, "variants": {"bam": {**results["variants"]["bam"], "tta": {"steps": 20, "check": "holdout"}}}}
    assert "| bam+tta (tta.check=holdout) | 1 | 2 |" in ablation_markdown(rescored)  # its own tta settings
    assert "| bam | 1 | 2 |" in ablation_markdown(rescored)  # the none row is not relabelled
    assert "| baseline | 1 | 1 | 30.0 ± 0.0 | 10.0 ± 0.0 | 30.0 ± 0.0 | **20.0 ± 0.0** |" in text
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(results))
    cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"ablation": str(path)})})
    write_report(cfg, tmp_path / "report", ["bam", "baseline"], {}, None)
    assert "## Ablation of the flagship" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "plots" / "ablation_targets.png").stat().st_size > 0


def test_sweep_section_lists_the_trials_and_the_chosen_values(cfg, tmp_path):
    trials = [{"trial": "t2", "config": {"train.optim.lr": 0.0919735, "model.memory.alpha": 0.5}, "score": 0.445,
               "epochs": 3, "status": "terminated", "error": None},
              {"trial": "t1", "config": {"train.optim.lr": 0.0265, "model.memory.alpha": 0.75}, "score": None,
               "epochs": 0, "status": "error", "error": "FloatingPointError: non-finite loss"}]
    tune = tmp_path / "tune"
    tune.mkdir()
    (tune / "trials.json").write_text(json.dumps({"metric": "val_miou", "trials": trials}))
    (tune / "best.yaml").write_text(yaml.safe_dump({"overrides": trials[0]["config"], "fold": 0, "shot": 1,
                                                    "sweep": "/x/tune-bam", "score": 0.445}, sort_keys=False))
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"out": str(tune)})})
    write_report(cfg, tmp_path / "report", ["bam", "baseline"], {}, qualitative_model=None)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Hyperparameter sweep (tune stage)" in text
    assert "| trial | `train.optim.lr` | `model.memory.alpha` | epochs | best val mIoU | status |" in text
    assert "| t2 | 0.09197 | 0.5 | 3 | 44.5 | terminated |" in text and "| t1 | 0.0265 | 0.75 | 0 | - | error |" in text
    assert "Training used: `train.optim.lr` = 0.09197, `model.memory.alpha` = 0.5." in text
    assert sweep_markdown({"trials": []}, {"note": "tune.trials is 0: params pass through unchanged"}) == (
        "No sweep: tune.trials is 0: params pass through unchanged; training used params.yaml as it is.\n")


def test_stages_record_their_time_and_the_report_lists_them(tmp_path, monkeypatch):
    from pipelines import common, evaluate_targets

    assert common.stage_name("pipelines/train_meta.py", ["--params", "p.yaml", "--tuned", "b.yaml", "--fold", "2",
                                                         "--shot", "5"]) == "train_meta fold 2 shot 5"
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{targets: {{}}}}\neval: {{out: {tmp_path / 'results'}}}\n"
                      f"report: {{out: {tmp_path / 'report'}}}\n")
    monkeypatch.setattr("sys.argv", ["evaluate_targets", "--params", str(params)])
    common.run(evaluate_targets.main, evaluate_targets.__file__)
    stages = tmp_path / "report" / "stages"
    recorded = json.loads((stages / "evaluate_targets.json").read_text())
    assert recorded["stage"] == "evaluate_targets" and recorded["seconds"] >= 0
    (stages / "train_base_fold_0.json").write_text(json.dumps({"stage": "train_base fold 0", "seconds": 30.0,
                                                               "finished": "2026-11-27T20:00:00+00:00"}))
    table = stages_markdown(stages)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith("| train_base fold 0 | 30 |")  # longest first
    assert rows[-1].startswith(f"| all recorded stages | {30 + recorded['seconds']:.0f} |")


def test_splits_summary_means_over_the_source_splits():
    from fssmeta.cross_domain import format_splits_report, splits_summary

    def report(gray: float, tiles: float) -> dict:
        entry = lambda m: {"miou_mean": m, "miou_std": 0.0}  # noqa: E731
        return {"protocol": {"resolution": "resized"}, "results": {"gray": {"1shot": entry(gray)},
                                                                   "tiles": {"1shot": entry(tiles)}},
                "mean_over_targets": {"1shot": (gray + tiles) / 2}}

    summary = splits_summary({0: report(0.2, 0.4), 1: report(0.4, 0.0), 3: report(0.6, 0.2)})
    assert summary["folds"] == [0, 1, 3] and list(summary["per_split"]) == ["fold0", "fold1", "fold3"]
    assert summary["per_split"]["fold1"]["mean_over_targets"]["1shot"] == pytest.approx(0.2)
    assert summary["mean"]["gray"]["1shot"] == pytest.approx(0.4) and summary["mean"]["tiles"]["1shot"] == pytest.approx(0.2)
    assert summary["mean_over_targets"]["1shot"] == pytest.approx((0.3 + 0.2 + 0.4) / 3)
    text = format_splits_report({"method": "bam", "regime": "none", **summary})
    assert "fold3" in text and "gray" in text and "30.0" in text.splitlines()[-2]
