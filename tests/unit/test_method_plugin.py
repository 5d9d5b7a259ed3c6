"""A method of another family is one file + one METHODS line + its options section: the HSNet-shaped stub of
tests/stub_method.py (no stage 1, resized training images, Adam at a constant rate, trained 1-shot, evaluated
at 1 and 5 shots) trains and evaluates through the real CLI with nothing else changed. (The same file in a
real `dvc repro`: tests/integration/test_method_plugin_dvc.py.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fssmeta.checkpoint import read_checkpoint
from fssmeta.cli import main
from fssmeta.models import METHODS
from fssmeta.runs import POINTER

STUB_FILE = Path(__file__).resolve().parents[1] / "stub_method.py"


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch):
    """The stub file imported as fssmeta.models.stub, and its METHODS line."""
    spec = importlib.util.spec_from_file_location("fssmeta.models.stub", STUB_FILE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fssmeta.models.stub", module)
    spec.loader.exec_module(module)
    monkeypatch.setitem(METHODS, "stub", module.METHOD)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny synthetic dataset with fold-0 lists and 1- and 5-shot episodes; no stage 1 anywhere."""
    root = tmp_path_factory.mktemp("plugin")
    sets = {"synthesize.out": root / "syn", "synthesize.image_size": 96, "synthesize.train_images": 80,
            "synthesize.test_images": 150, "synthesize.val_images": 100, "synthesize.target_images_per_class": 1,
            "data.root": root / "syn", "data.prepared": root / "prepared", "data.cache_dir": root / "cache",
            "data.targets": "{}", "data.min_object_pixels": 200, "episodes.out": root / "episodes",
            "episodes.folds": "[0]", "episodes.shots": "[1, 5]", "episodes.orders": "[image]",
            "episodes.test_episodes": 8, "episodes.test_seeds": "[0]", "episodes.val_episodes": 4,
            "transform.crop_size": 65, "eval.test_size": 65, "eval.episodes": 8, "eval.folds": "[0]", "eval.shots": "[1, 5]",
            "eval.out": root / "results", "train.out": root / "runs", "train_base.out": root / "runs",
            "train.epochs": 2, "train.episodes_per_epoch": 8, "train.batch_size": 4, "train.val_episodes": 4,
            "model.method": "stub"}
    args = ["--params", "none", "--quiet", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    for stage in ("synthesize", "prepare", "episodes"):
        assert main([stage, *args]) == 0, stage
    return root, args


def test_stub_trains_and_evaluates_from_its_record_alone(stub, data, monkeypatch: pytest.MonkeyPatch):
    root, args = data
    kinds = []
    import fssmeta.stages as stages

    real_transform = stages.training_transform
    monkeypatch.setattr(stages, "training_transform", lambda kind, cfg: kinds.append(kind) or real_transform(kind, cfg))

    # asked for 5 shots, it trains 1-shot (its record) into stub-1shot, from no stage 1, with its options
    assert main(["train", *args, "--shot", "5", "--set", "model.stub.support_masking=hybrid"]) == 0
    run = root / "runs" / "fold0" / "stub-1shot"
    assert (run / "best.pt").is_file() and not (root / "runs" / "fold0" / "base").exists()
    assert kinds == ["resize"]
    payload = read_checkpoint(run / "best.pt")
    assert payload["config"]["train"]["shot"] == 1
    assert payload["config"]["model"]["stub"] == {"hidden": 8, "support_masking": "hybrid"}
    # its recipe: Adam (no train.optim key set), constant 1e-3
    assert all("betas" in group for group in payload["optimizer"]["param_groups"])
    assert payload["optimizer"]["state"] and all("exp_avg" in s for s in payload["optimizer"]["state"].values())
    history = json.loads((run / "history.json").read_text())["history"]
    assert [h["lr"] for h in history] == [pytest.approx(1e-3)] * 2
    assert set(history[0]) >= {"train_ce", "train_loss", "val_miou"} and "train_aux" not in history[0]

    # evaluated at 1 and 5 shots with that one checkpoint, into the one results layout the report reads
    assert main(["evaluate", *args, "--method", "stub", "--set", "model.stub.support_masking=hybrid"]) == 0
    result = json.loads((root / "results" / "fold0" / "stub.json").read_text())
    assert set(result["results"]["fold0"]) == {"1shot", "5shot"}
    assert result["protocol"]["trained_shots"] == "1 (evaluated at every shot)"
    # the conventions the numbers were measured under: the query-class rule and the method's own canvas
    assert result["protocol"]["query_class"] == "present" and result["protocol"]["canvas"] == "pfenet"
    for shot in ("1shot", "5shot"):
        assert 0.0 <= result["results"]["fold0"][shot]["miou_mean"] <= 1.0
    assert not (root / "runs" / "fold0" / "stub-5shot" / POINTER).exists()  # only the DVC stage writes pointers

    # evaluation runs in fp32 unless eval.amp says otherwise (training's train.amp does not decide it)
    import fssmeta.evaluation as evaluation

    amps: list[str] = []
    real_evaluate = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: amps.append(k["amp"]) or real_evaluate(*a, **k))
    assert main(["evaluate", *args, "--method", "stub", "--set", "eval.shots=[1]", "--set", "eval.episodes=2", "--set", "train.amp=true"]) == 0
    first, amps[:] = amps[:], []
    assert main(["evaluate", *args, "--method", "stub", "--set", "eval.shots=[1]", "--set", "eval.episodes=2", "--set", "eval.amp=true"]) == 0
    assert set(first) == {"off"} and set(amps) == {"cuda"}  # eval.amp=true reads as `cuda` (config.Amp)


def test_stub_options_are_checked_at_load(stub, data, capsys: pytest.CaptureFixture[str]):
    _, args = data
    assert main(["show-config", *args, "--set", "model.stub.bogus=1"]) == 2
    assert "model.stub.bogus: unknown key" in capsys.readouterr().err
    assert main(["show-config", *args, "--set", "model.stub.support_masking=both"]) == 2
    assert "model.stub.support_masking: Input should be 'feature', 'input' or 'hybrid'" in capsys.readouterr().err


def test_stub_gets_the_family_neutral_model_checks(stub):
    from tests.unit.test_models import check_forward_backward

    for shot in (1, 5):
        check_forward_backward("stub", shot)


def test_methods_command_lists_every_record(stub, capsys: pytest.CaptureFixture[str]):
    assert main(["methods", "--params", "none"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(METHODS)
    assert rows["stub"].split()[1:8] == ["-", "adam", "0.001", "frozen", "pfenet", "resize", "1-shot"]
    assert rows["bam"].split()[1:8] == ["base_learner", "sgd", "0.05", "frozen", "bam", "pfenet", "each"]
    assert rows["pfenet"].split()[1:5] == ["backbone", "sgd", "0.025", "train"]


def test_a_part_switch_the_method_does_not_read_is_refused(stub):
    from fssmeta.config import MemoryConfig, MiningConfig, ModelConfig
    from fssmeta.models import build_model

    with pytest.raises(ValueError, match=r"model\.memory\.enabled: stub takes no memory part "
                                         r"\(methods that do: bam, hdmnet, ntrenet, pfenet, sccan\)"):
        build_model(ModelConfig(method="stub", memory=MemoryConfig(enabled=True)), shot=1, base_classes=[])
    with pytest.raises(ValueError, match=r"model\.mining\.enabled: pfenet takes no mining part"):
        build_model(ModelConfig(method="pfenet", mining=MiningConfig(enabled=True)), shot=1, base_classes=[])
    assert build_model(ModelConfig(method="stub"), shot=1, base_classes=[]) is not None

