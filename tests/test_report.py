"""The report: table and metrics computed from per-fold evaluation files, plots written as PNG."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fssmeta.config import load_config
from fssmeta.data.io import DataError
from fssmeta.report import markdown_table, metrics, plot_per_class, plot_training_curves, write_report


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
