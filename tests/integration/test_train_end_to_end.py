"""Integration: on the synthetic data, base learner + BAM trained briefly on CPU lower their loss and beat
the non-learned prototype baseline on the fixed test episodes; the CLI stages chain."""

from __future__ import annotations

import json

import pytest

from fssmeta.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    sets = {
        "synthesize.out": root / "syn", "synthesize.image_size": 96, "synthesize.train_images": 400,
        # 6 target images per class: ceil(0.2 x 6) = 2 go to the selection pool (episodes.target_val_fraction),
        # 4 stay for the test lists; with 3, a class had 1 selection image, too few for a 1-shot episode
        "synthesize.test_images": 100, "synthesize.val_images": 60, "synthesize.target_images_per_class": 6,
        "data.root": root / "syn", "data.prepared": root / "prepared", "data.cache_dir": root / "cache",
        "data.targets": "{}", "data.min_object_pixels": 600,
        "episodes.out": root / "episodes", "episodes.folds": "[0]", "episodes.shots": "[1]",
        "episodes.test_episodes": 120, "episodes.test_seeds": "[0, 1]", "episodes.val_episodes": 40,
        "transform.crop_size": 97, "eval.test_size": 97, "eval.folds": "[0]", "eval.shots": "[1]",
        "eval.out": root / "results",
        "model.bam.aspp_dilations": "[1, 2, 3]",
        "train_base.out": root / "runs", "train_base.epochs": 6, "train_base.episodes_per_epoch": 320,
        # stage 1 as before BAM's recipe became the default: one rate from random init, crops of 97
        "train_base.optim.lr": 0.01, "train_base.encoder_lr_scale": 1.0, "train_base.transform.crop_size": 97,
        "train_base.transform.scale_min": 0.9, "train_base.transform.scale_max": 1.1,
        "train_base.val_episodes": 30,
        "model.backbone_source": "stage1",  # the baseline: no ImageNet weights here
        "train.out": root / "runs", "train.epochs": 4, "train.episodes_per_epoch": 160,
        "train.val_episodes": 40,
    }
    args = ["--params", "none", "--quiet"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    for stage in ("synthesize", "prepare", "episodes", "train-base", "train"):
        assert main([stage, *args]) == 0, stage
    return root, args


def test_losses_fall(workspace):
    root, _ = workspace
    base = json.loads((root / "runs/fold0/base/history.json").read_text())["history"]
    assert base[-1]["train_loss"] < 0.85 * base[0]["train_loss"]
    meta = json.loads((root / "runs/fold0/bam-1shot/history.json").read_text())
    assert meta["history"][-1]["train_loss"] < meta["history"][0]["train_loss"]
    assert meta["score_key"] == "val_miou" and 1 <= meta["best_epoch"] <= 4
    assert (root / "runs/fold0/bam-1shot/best.pt").is_file()


def test_bam_beats_the_non_learned_baseline(workspace, capsys):
    root, args = workspace
    assert main(["evaluate", *args]) == 0
    assert main(["evaluate", "--method", "baseline", *args]) == 0
    out = capsys.readouterr().out
    assert "mIoU mean +- std over seeds" in out
    bam = json.loads((root / "results/fold0/bam.json").read_text())  # the layout the evaluate stage writes too
    baseline = json.loads((root / "results/fold0/baseline.json").read_text())
    assert bam["protocol"]["checkpoint_selection"] == "validation list"
    assert len(bam["results"]["fold0"]["1shot"]["seeds"]) == 2
    assert bam["mean"]["1shot"]["miou"] > baseline["mean"]["1shot"]["miou"] + 0.03


def test_evaluate_without_training_names_the_missing_checkpoint(workspace, capsys):
    _, args = workspace
    assert main(["evaluate", "--method", "pfenet", *args]) == 2
    assert "pfenet-1shot/best.pt: no trained pfenet for fold 0, 1-shot" in capsys.readouterr().err


def test_cross_domain_evaluation_on_the_synthetic_targets(workspace, capsys):
    root, args = workspace
    targets = (f"data.targets={{gray: {{layout: deepglobe, root: {root}/syn/targets/gray}}, "
               f"hazy: {{layout: fss1000, root: {root}/syn/targets/hazy}}}}")
    # the source: fold 0's model (`eval.target_source: fold`; the all-classes model is the dvc test's)
    extra = ["--set", targets, "--set", "episodes.target_episodes=8", "--set", "eval.resized_size=97",
             "--set", "eval.target_source=fold"]
    assert main(["episodes", *args, *extra]) == 0
    for method in ("bam", "baseline"):
        assert main(["evaluate", "--targets", "--method", method, *args, *extra]) == 0
    printed = capsys.readouterr().out
    assert "bam (source: fold 0, regime none) on the targets, resized 97" in printed and "\ngray " in printed
    report = json.loads((root / "results/fold0/targets/bam.json").read_text())  # beside fold 0's own results
    assert set(report["results"]) == {"gray", "hazy"}
    assert report["protocol"]["checkpoint_selection"] == "source validation list"
    gray = report["results"]["gray"]["1shot"]
    assert len(gray["seeds"]) == 2 and gray["seeds"][0]["episodes"] == 8
    assert set(gray["seeds"][0]["per_class"]) <= {"1", "2", "3", "4"} and 0.0 <= gray["miou_mean"] <= 1.0
    assert 0.0 < report["mean_over_targets"]["1shot"] <= 1.0
    # the tta regime: its own file beside the none one, its settings recorded, its own episode count
    tta = ["--regime", "tta", "--set", "eval.tta.steps=2", "--set", "eval.tta.episodes=3"]
    assert main(["evaluate", "--targets", "--method", "bam", *args, *extra, *tta]) == 0
    adapted = json.loads((root / "results/fold0/targets/bam-tta.json").read_text())
    assert adapted["regime"] == "tta" and adapted["protocol"]["regime"]["tta"]["steps"] == 2
    assert adapted["results"]["gray"]["1shot"]["seeds"][0]["episodes"] == 3
    assert json.loads((root / "results/fold0/targets/bam.json").read_text()) == report  # untouched
    assert main(["evaluate", "--targets", "--method", "baseline", *args, *extra, *tta]) == 2
    assert "baseline learns nothing" in capsys.readouterr().err
    # RMT's protocol: every eval.folds model (here the one fold trained) scores the targets, and the mean
    assert main(["evaluate", "--targets", "--splits", "--method", "bam", *args, *extra]) == 0
    splits = json.loads((root / "results/targets/bam-splits.json").read_text())
    assert splits["folds"] == [0] and splits["source"] == "splits"
    assert splits["mean_over_targets"]["1shot"] == pytest.approx(report["mean_over_targets"]["1shot"])
    assert "every split's model" in capsys.readouterr().out


def test_score_domain_uses_fixed_validation_episodes(workspace):
    """What promotion compares: a trained model on a domain's fixed episodes, the same number twice."""
    import torch

    from fssmeta.cross_domain import score_domain
    from fssmeta.data.io import DataError
    from fssmeta.params import load_config
    from fssmeta.runs import evaluation_model

    _, args = workspace
    sets = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
    cfg = load_config(None, sets)
    model = evaluation_model(cfg, 0, 1, "bam", torch.device("cpu"))
    first = score_domain(cfg, model, "source", fold=0, shot=1)
    assert 0.0 < first <= 1.0 and score_domain(cfg, model, "source", fold=0, shot=1) == first
    with pytest.raises(DataError, match="domain 'mars': not `source` nor a data.targets name"):
        score_domain(cfg, model, "mars", fold=0, shot=1)
