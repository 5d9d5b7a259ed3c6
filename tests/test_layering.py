"""House rule: the core imports no Ray, MLflow or DVC (only fssmeta/integrations and pipelines may)."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_services():
    code = (
        "import sys, fssmeta.cli, fssmeta.config, fssmeta.metrics, fssmeta.data.dataset, "
        "fssmeta.data.prepare, fssmeta.data.episode_lists, fssmeta.data.synthetic, fssmeta.data.coco, "
        "fssmeta.data.targets;"
        "bad = [m for m in ('ray', 'mlflow', 'dvc', 'torchvision') if m in sys.modules];"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
