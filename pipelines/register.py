"""DVC stage `register`: every (fold, shot) best checkpoint becomes a version of the registered model
`mlflow.registered_model`, tagged with its metrics and protocol (status=candidate; no alias is moved —
promotion gates decide that). Idempotent: a checkpoint already registered returns its version."""

from __future__ import annotations

from pathlib import Path

from fssmeta.data.io import read_json, write_json_atomic
from fssmeta.data.prepare import load_fold
from fssmeta.experiment import meta_dir
from fssmeta.integrations.mlflow import register_model
from fssmeta.tracking import protocol_tags
from pipelines.common import config, parser


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    out = Path(cfg.report.out)
    table = read_json(out / "metrics.json", "report metrics (run the report stage)")
    method = cfg.model.method
    versions = []
    for fold in cfg.eval.folds:
        for shot in cfg.eval.shots:
            scores = table[method][f"{shot}shot"][f"fold{fold}"]
            metrics = {"miou": scores["miou"], "miou_std": scores["miou_std"], "fb_iou": scores["fb_iou"]}
            cross = table.get("cross_domain", {}).get(method, {}).get(f"{shot}shot")
            if cross and fold == cfg.eval.target_fold:  # the per-domain scores promotion compares
                metrics |= {f"target_{name}_miou": value for name, value in cross.items()}
            info = register_model(cfg, checkpoint=meta_dir(cfg, fold, shot) / "best.pt", metrics=metrics,
                                  tags=protocol_tags(cfg, fold=fold, shot=shot), fold=fold, shot=shot,
                                  base_classes=load_fold(cfg.data.prepared, fold)["base"])
            versions.append({"fold": fold, "shot": shot, **info})
            state = "registered" if info["created"] else "already registered"
            print(f"register: {info['name']} version {info['version']} ({method}, fold {fold}, {shot}-shot) {state}")
    write_json_atomic(out / "registered.json", {"registered_model": cfg.mlflow.registered_model, "versions": versions})


if __name__ == "__main__":
    main()
