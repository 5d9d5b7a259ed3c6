"""benchmarks/fold_means.py: per-fold ablation files merged (a later file's regime replacing an earlier one's),
the fold means, the refusal to average a regime scored under different settings, and the FS-CS table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fold_means.py"
spec = importlib.util.spec_from_file_location("fold_means", SCRIPT)
fold_means = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fold_means)

TTA = {"steps": 20, "check": "holdout"}


def results(fold: int, in_domain: float, targets: dict[str, dict[str, float]], tta: dict | None = TTA) -> dict:
    run = {"in_domain": {"1shot": in_domain},
           "targets": {regime: {t: {"1shot": v} for t, v in scores.items()} for regime, scores in targets.items()}}
    return {"source_fold": fold, "tta": tta, "variants": {"m": {"runs": {"0": run}, "tta": tta}}}


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_folds_are_merged_and_averaged(tmp_path: Path):
    files = [write(tmp_path / "f0.json", results(0, 0.40, {"none": {"a": 0.10, "b": 0.30}, "tta": {"a": 0.0, "b": 0.0}},
                                                  tta={"steps": 5})),
             write(tmp_path / "f1.json", results(1, 0.60, {"none": {"a": 0.30, "b": 0.50}, "tta": {"a": 0.2, "b": 0.4}})),
             write(tmp_path / "f0_tta.json", results(0, 0.99, {"tta": {"a": 0.4, "b": 0.6}}))]  # rescored fold 0
    merged = fold_means.fold_entries(files)
    assert merged[("m", 0)]["in_domain"] == {"1shot": 0.40}  # the first file's in-domain score stays
    assert merged[("m", 0)]["targets"]["none"]["a"] == {"1shot": 0.10}  # kept: the rescore file has no `none`
    table = fold_means.table(merged, ["none", "tta"])
    assert "| m | none | 1 | 40.0 / 60.0 | **50.0** | 20.0 / 40.0 | **30.0** | a 20.0, b 40.0 |" in table
    assert "| m | tta | 1 | — / — | **—** | 50.0 / 30.0 | **40.0** | a 30.0, b 50.0 |" in table


def test_a_regime_scored_under_different_settings_is_refused(tmp_path: Path):
    files = [write(tmp_path / "f0.json", results(0, 0.4, {"tta": {"a": 0.1}}, tta={"steps": 5})),
             write(tmp_path / "f1.json", results(1, 0.6, {"tta": {"a": 0.3}}))]
    with pytest.raises(SystemExit, match="m tta: scored under different settings on different folds"):
        fold_means.table(fold_means.fold_entries(files), ["tta"])


def test_fscs_scores_are_averaged_over_folds_and_seeds(tmp_path: Path):
    def fscs(fold: int, runs: list[tuple[float, float]], ways: int = 2) -> dict:
        data = results(fold, 0.5, {"none": {"a": 0.1}})
        data["variants"]["m"]["runs"] = {
            str(i): {**data["variants"]["m"]["runs"]["0"], "fscs": {"1shot": {"ways": ways, "er_mean": er,
                                                                              "miou_mean": miou}}}
            for i, (er, miou) in enumerate(runs)}
        return data

    files = [write(tmp_path / "f0.json", fscs(0, [(0.30, 0.20), (0.50, 0.40)])),  # two training seeds
             write(tmp_path / "f1.json", fscs(1, [(0.60, 0.50)]))]
    table = fold_means.fscs_table(fold_means.fold_entries(files))
    assert "| m | 2 | 1 | 40.0 / 60.0 | **50.0** | 30.0 / 50.0 | **40.0** |" in table
    files.append(write(tmp_path / "f2.json", fscs(2, [(0.1, 0.1)], ways=3)))
    with pytest.raises(SystemExit, match="scored at different ways on different folds"):
        fold_means.fscs_table(fold_means.fold_entries(files))


def test_all_background_reference_counts_the_scored_episodes_with_no_way_present(tmp_path: Path):
    """The row's ER per fold = the share of the first `episodes_per_list` episodes of each test seed's list
    with every presence false, averaged over the seeds; a missing list is refused naming it."""
    presence = {0: [[False, False], [True, False], [False, False], [False, False]],  # first 3 scored: 2 of 3
                1: [[False, True], [True, True], [False, False], [True, False]]}  # 1 of 3
    lists = tmp_path / "episodes"
    for seed, rows in presence.items():
        (lists / "fold0").mkdir(parents=True, exist_ok=True)
        write(lists / "fold0" / f"test_2way_1shot_image_seed{seed}.json",
              {"episodes": [{"presence": p} for p in rows]})
    data = results(0, 0.5, {"none": {"a": 0.1}})
    data.update({"test_seeds": [0, 1], "episodes_per_list": 3})
    data["variants"]["m"]["runs"]["0"]["fscs"] = {"1shot": {"ways": 2, "er_mean": 0.6, "miou_mean": 0.3}}
    files = [write(tmp_path / "f0.json", data)]
    merged = {**fold_means.fold_entries(files), **fold_means.all_background(files, lists)}
    table = fold_means.fscs_table(merged)
    assert "| all background | 2 | 1 | 50.0 | **50.0** | 0.0 | **0.0** |" in table
    assert "| m | 2 | 1 | 60.0 | **60.0** | 30.0 | **30.0** |" in table
    (lists / "fold0" / "test_2way_1shot_image_seed1.json").unlink()
    with pytest.raises(SystemExit, match="test_2way_1shot_image_seed1.json: no such N-way list"):
        fold_means.all_background(files, lists)
