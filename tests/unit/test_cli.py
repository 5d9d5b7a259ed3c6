"""CLI errors a user meets: one line naming the path, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from fssmeta.cli import main


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
