"""CLI errors a user meets: one line naming the path, exit code 2, no traceback (an output folder that is a
file, a corrupt checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fssmeta.cli import main
from tests.mlflow_helpers import encode, episode_arrays, save_model, tiny_config


def test_an_output_folder_that_is_a_file_is_a_one_line_error(tiny_voc: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["prepare", "--params", "none", "--quiet", "--set", "data.dataset=pascal", "--set", f"data.root={tiny_voc}",
            "--set", "data.val_list=", "--set", "data.min_object_pixels=0", "--out", str(blocker / "prepared")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fssmeta prepare: error: ") and str(blocker) in err
    assert blocker.read_text() == "not a folder"  # nothing written over it


@pytest.fixture
def predict_inputs(tmp_path: Path) -> tuple[Path, list[str]]:
    """A tiny training checkpoint and the `--support` / `--query` arguments of one episode."""
    query, support, mask = episode_arrays(0)
    for name, array in (("query.png", query), ("support.png", support), ("mask.png", mask)):
        (tmp_path / name).write_bytes(encode(array))
    checkpoint = save_model(tiny_config(), tmp_path / "best.pt", seed=0)
    return checkpoint, [f"--support={tmp_path / 'support.png'}:{tmp_path / 'mask.png'}",
                        f"--query={tmp_path / 'query.png'}"]


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_predict_out_at_a_file_is_a_one_line_error(where: str, predict_inputs: tuple[Path, list[str]],
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    checkpoint, episode = predict_inputs
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "predictions"
    assert main(["predict", "--params", "none", "--quiet", "--model", str(checkpoint), *episode,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"fssmeta predict: error: {out}: a file is ")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_a_corrupt_checkpoint_is_not_advised_to_load_unsafely(content: bytes, predict_inputs: tuple[Path, list[str]],
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    _, episode = predict_inputs
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(content)
    assert main(["predict", "--params", "none", "--quiet", "--model", str(corrupt), *episode,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"fssmeta predict: error: {corrupt}: not a safe fssmeta checkpoint")
    assert "weights_only=False" not in err and "`weights_only` set to `False`" not in err
    assert not (tmp_path / "out").exists()


def test_fold_is_a_fold_or_all_and_anything_else_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    # `all` = the all-classes source split (PATNet's cross-domain source model); a bad value stops argparse
    with pytest.raises(SystemExit) as stopped:
        main(["train-base", "--params", "none", "--fold", "4"])
    assert stopped.value.code == 2
    assert "a source split is a fold 0..3 or `all` (every source class), got '4'" in capsys.readouterr().err
    # `all` parses, and reaches the stage, which names what is missing for that split
    assert main(["train-base", "--params", "none", "--quiet", "--fold", "all", "--set",
                 "data.prepared=/nonexistent/prepared"]) == 2
    assert "/nonexistent/prepared/all.json: not found; run `fssmeta prepare` first" in capsys.readouterr().err


def test_the_all_classes_stages_skip_unless_it_is_the_target_source(tmp_path: Path):
    from fssmeta.params import load_config
    from pipelines.common import skip_unused_all

    cfg = load_config(None, {"eval.target_source": "splits"})
    assert not skip_unused_all(cfg, 0, tmp_path / "fold0")  # a fold always trains
    assert skip_unused_all(cfg, "all", tmp_path / "all")
    assert "eval.target_source is splits" in (tmp_path / "all" / "skipped.json").read_text()
    assert not skip_unused_all(load_config(None, {"eval.target_source": "all"}), "all", tmp_path / "again")
    assert not (tmp_path / "again").exists()
