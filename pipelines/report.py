"""DVC stage `report`: results table (report.md, metrics.json for `dvc metrics show`) and PNG plots under
`<report.out>`, also logged to an MLflow run."""

from __future__ import annotations

from pathlib import Path

from fssmeta.report import load_histories, write_report
from fssmeta.runs import default_device, evaluation_model, meta_dir
from fssmeta.tracking import flatten, protocol_tags
from pipelines.common import config, parser, run


def main() -> None:
    cfg = config(parser(__doc__).parse_args())
    method = cfg.model.method
    runs = {f"fold{f} {s}-shot": meta_dir(cfg, f, s) for f in cfg.eval.folds for s in cfg.eval.shots}
    model = evaluation_model(cfg, cfg.eval.folds[0], cfg.eval.shots[0], method, default_device())
    out = Path(cfg.report.out)
    table = write_report(cfg, out, [method, "baseline"], load_histories(cfg, runs), model)
    print((out / "report.md").read_text())
    if cfg.mlflow.enabled:
        from fssmeta.integrations.mlflow import tracker_from_config

        tags = protocol_tags(cfg, fold=-1, shot=-1) | {"stage": "report"}
        with tracker_from_config(cfg, run_name=f"report-{method}", tags=tags) as tracker:
            tracker.log_metrics({k: v for k, v in flatten(table).items() if isinstance(v, float)}, step=0)
            for path in [out / "report.md", out / "metrics.json", *sorted((out / "plots").glob("*.png"))]:
                tracker.log_artifact(path, "report")


if __name__ == "__main__":
    run(main, __file__)
