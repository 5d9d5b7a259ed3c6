"""The MLflow integration against a real MLflow on a sqlite file: tracker runs (params, metrics, tags,
artifacts, rank 0 only, FAILED on an exception, resume by run id) and the model registry (idempotent
versions, a pyfunc model that loads and segments)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fssmeta import distributed, tracking
from fssmeta.config import Config, MlflowConfig, config_to_dict
from fssmeta.tracking import flatten, protocol_tags

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read once, when mlflow is imported
import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from fssmeta.checkpoint import CheckpointError, file_sha256  # noqa: E402
from fssmeta.cli import main  # noqa: E402
from fssmeta.integrations.mlflow import (  # noqa: E402
    MLflowTracker,
    resolve_artifact_location,
    resolve_config,
    resolve_tracking_uri,
    tracker_from_config,
    valid_name,
)
from fssmeta.integrations.mlflow_model import load_logged_model  # noqa: E402
from fssmeta.integrations.registry import load_registered, register_model  # noqa: E402
from tests.mlflow_helpers import (  # noqa: E402
    BASE_CLASSES,
    SIZE,
    decode_png,
    request_row,
    save_model,
    tiny_config,
)

pytestmark = [pytest.mark.integration,
              # MLflow's own use of a deprecated SQLAlchemy loader, not ours
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite file for the module (a new one costs ~1.4 s of migrations); tests use own experiments."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def cfg(store: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Config]:
    """A config with the default relative paths, run from inside the store folder; no mlruns may appear."""
    monkeypatch.chdir(store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "git_commit", lambda cwd=".": "0123abc")
    name = request.node.name
    yield tiny_config(mlflow=MlflowConfig(tracking_uri="sqlite:///mlflow.db", artifact_location="mlartifacts",
                                          experiment=name, registered_model=f"fss-{name}"))
    assert not (store / "mlruns").exists(), "artifacts must go to the configured location, not ./mlruns"


def client_for(cfg: Config) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=resolve_tracking_uri(cfg.mlflow))


def test_tracker_logs_params_metrics_tags_and_artifacts(cfg: Config, store: Path):
    params = flatten(config_to_dict(cfg))
    assert len(params) > 100  # more than one MLflow batch
    tags = {**protocol_tags(cfg, fold=0, shot=1), "stage": "train_meta"}
    (store / "history.json").write_text('[{"epoch": 0}]')
    with tracker_from_config(cfg, run_name="bam fold0 1shot", tags=tags) as tracker:
        for epoch in range(3):
            tracker.log_metrics({"train/loss": 1.0 / (epoch + 1), "val_miou": 0.1 * epoch, "lr@group0": 0.05},
                                step=epoch)
        tracker.log_artifact(store / "history.json", artifact_path="curves")

    client = client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train_meta'")
    assert run.info.run_id == tracker.run_id and run.info.run_name == "bam fold0 1shot"
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert run.data.params["train.optim.lr"] == "0.05" and run.data.params["eval.shots"] == "[1, 5]"
    assert tags.items() <= run.data.tags.items()
    assert run.data.tags["params_hash"] == tracking.params_hash(cfg)
    history = client.get_metric_history(run.info.run_id, "val_miou")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3
    assert "lr_group0" in run.data.metrics  # '@' is not allowed in an MLflow name
    assert [a.path for a in client.list_artifacts(run.info.run_id, "curves")] == ["curves/history.json"]
    assert run.info.artifact_uri == (store / "mlartifacts" / run.info.run_id / "artifacts").as_uri()
    stored = store / "mlartifacts" / run.info.run_id / "artifacts" / "curves" / "history.json"
    assert stored.read_text() == '[{"epoch": 0}]'



def test_other_ranks_log_nothing(cfg: Config, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    with MLflowTracker(cfg.mlflow, run_name="rank1", tags={"a": "b"}) as tracker:
        tracker.log_params(config_to_dict(cfg))
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(__file__)
        tracker.set_tags({"c": "d"})
    assert tracker.run_id is None and tracker.experiment_id is None
    assert client_for(cfg).get_experiment_by_name(cfg.mlflow.experiment) is None


def test_exception_fails_the_run_and_resume_appends(cfg: Config):
    with pytest.raises(RuntimeError, match="worker died"):
        with MLflowTracker(cfg.mlflow, run_name="flaky", tags={"attempt": "1"}) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("worker died")
    client = client_for(cfg)
    assert client.get_run(tracker.run_id).info.status == "FAILED"

    # as a restarted Ray worker would: the same params again (allowed: same values), appended metrics
    resumed = tracker_from_config(cfg, run_name="flaky", tags={"attempt": "2"}, run_id=tracker.run_id)
    assert (resumed.run_id, resumed.experiment_id) == (tracker.run_id, tracker.experiment_id)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 0.5}, step=1)
    resumed.close()
    resumed.close()  # a second close changes nothing

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["attempt"] == "2"
    assert run.data.params["model.method"] == "bam"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    assert len(client.search_runs([tracker.experiment_id])) == 1
    with pytest.raises(ValueError, match="status must be one of"):
        resumed.close("DONE")


def test_environment_tracking_uri_wins(cfg: Config, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert resolve_tracking_uri(cfg.mlflow) == f"sqlite:///{store / 'mlflow.db'}"  # relative -> absolute
    env_uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    assert resolve_tracking_uri(cfg.mlflow) == env_uri
    with MLflowTracker(cfg.mlflow, run_name="env") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert mlflow.MlflowClient(env_uri).get_run(tracker.run_id).data.metrics == {"loss": 1.0}
    shipped = resolve_config(cfg.mlflow)  # what a Ray driver sends to its workers
    assert (shipped.tracking_uri, shipped.artifact_location) == (env_uri, (store / "mlartifacts").as_uri())
    project = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert project.get_experiment_by_name(cfg.mlflow.experiment) is None


def test_names_and_locations():
    assert valid_name("val/mIoU (fold 0)") == "val/mIoU _fold 0_"
    assert valid_name("a//b/./c/../d:e") == "a/b/c/__/d_e"
    assert valid_name("/") == "_"
    assert resolve_artifact_location("s3://bucket/fssmeta") == "s3://bucket/fssmeta"
    assert resolve_artifact_location("") is None
    assert resolve_artifact_location("/abs/art") == "file:///abs/art"
    assert tracker_from_config(Config(mlflow=MlflowConfig(enabled=False)), run_name="x", tags={}).__class__ \
        is tracking.NullTracker


def test_register_is_idempotent_and_the_model_serves(cfg: Config, store: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    checkpoint = save_model(cfg, tmp_path / "best.pt", seed=0)
    tags = protocol_tags(cfg, fold=0, shot=1)
    kwargs = {"checkpoint": checkpoint, "tags": tags, "fold": 0, "shot": 1, "base_classes": BASE_CLASSES}
    first = register_model(cfg, metrics={"miou_mean": 0.41, "fbiou_mean": 0.62}, **kwargs)
    name = cfg.mlflow.registered_model
    assert first == {"name": name, "version": "1", "run_id": first["run_id"], "model_uri": f"models:/{name}/1",
                     "created": True}

    client = client_for(cfg)
    version = client.get_model_version(name, "1")
    assert tags.items() <= version.tags.items()
    assert {"status": "candidate", "metric.miou_mean": "0.41", "fold": "0", "shot": "1",
            "method": "bam"}.items() <= version.tags.items()
    assert len(version.tags["checkpoint_sha256"]) == 64
    assert client.get_registered_model(name).aliases == {}  # promotion moves aliases, not registration
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["miou_mean"] == 0.41
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run.info.run_id
    assert logged.artifact_location.startswith((store / "mlartifacts").as_uri())
    assert {m.key: m.value for m in logged.metrics} == {"miou_mean": 0.41, "fbiou_mean": 0.62}

    again = register_model(cfg, metrics={"miou_mean": 0.41}, **kwargs)
    assert again == {**first, "created": False}
    save_model(cfg, checkpoint, seed=1)  # retrained: same path, other weights
    second = register_model(cfg, metrics={"miou_mean": 0.45}, **kwargs)
    assert (second["version"], second["created"]) == ("2", True)
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    model = load_registered(cfg, "2")
    rows = [request_row(0), request_row(0), request_row(1, query_shape=(SIZE, 40))]
    wrapped = "\n".join(textwrap.wrap(rows[0]["query_img"], 76))  # as `base64` prints it, in a data URL
    rows[1]["query_img"] = f"data:image/png;base64,{wrapped}"
    outputs = model.predict(pd.DataFrame(rows))
    assert len(outputs) == 3
    assert outputs[1] == outputs[0]  # the same episode -> the same output
    mask = np.asarray(decode_png(outputs[0]["mask"]))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
    assert (outputs[0]["height"], outputs[0]["width"]) == (50, 70)
    assert outputs[0]["foreground_fraction"] == pytest.approx((mask == 255).mean())
    assert np.asarray(decode_png(outputs[2]["foreground_probability"])).shape == (SIZE, 40)
    two_supports = {**rows[0], "support_imgs": rows[0]["support_imgs"] * 2,
                    "support_masks": rows[0]["support_masks"] * 2}
    with pytest.raises(MlflowException, match="1-shot model") as failure:
        model.predict(pd.DataFrame([two_supports]))
    assert failure.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match=r"unknown column\(s\) mask_url, note \(expected query_img, "
                                              r"support_imgs, support_masks, optionally mask_threshold, "
                                              r"mask_class\)") as failure:
        model.predict(pd.DataFrame([{**rows[0], "mask_url": "x", "note": "y"}]))  # MLflow would drop them silently
    assert failure.value.error_code == "INVALID_PARAMETER_VALUE"
    # the optional per-row mask options are request columns; a 0/255 mask thresholded gives the same answer
    with_options = model.predict(pd.DataFrame([{**rows[0], "mask_threshold": 128}, {**rows[0], "mask_threshold": None}]))
    assert with_options == [outputs[0], outputs[0]]
    monkeypatch.setenv("FSSMETA_MAX_REQUEST_ROWS", "2")  # the served row limit, read per request
    with pytest.raises(MlflowException, match=r"3 rows, at most 2 per request.*FSSMETA_MAX_REQUEST_ROWS") as failure:
        model.predict(pd.DataFrame(rows))
    assert failure.value.error_code == "INVALID_PARAMETER_VALUE"

    client.set_registered_model_alias(name, "champion", "1")
    champion = load_registered(cfg, "champion")
    assert champion.predict(pd.DataFrame([rows[0]]))[0]["height"] == 50


def test_a_swapped_checkpoint_artifact_is_refused(cfg: Config, tmp_path: Path):
    checkpoint = save_model(cfg, tmp_path / "best.pt", seed=0)
    registered = file_sha256(checkpoint)
    register_model(cfg, checkpoint=checkpoint, metrics={}, tags={}, fold=0, shot=1, base_classes=BASE_CLASSES)
    client = client_for(cfg)
    version = client.get_model_version(cfg.mlflow.registered_model, "1")
    location = Path(client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
                    .removeprefix("file://"))
    [artifact] = location.rglob("best.pt")
    [info_file] = location.rglob("fssmeta_model.json")
    artifact.write_bytes(save_model(cfg, tmp_path / "other.pt", seed=1).read_bytes())  # other weights, same format
    swapped = file_sha256(artifact)
    assert swapped != registered

    # The pyfunc's own load (what `mlflow models serve` runs) and the checkpoint loader of predict / promotion
    for load in (lambda: load_registered(cfg, "1"), lambda: load_logged_model(cfg.mlflow, version.source)):
        with pytest.raises(CheckpointError) as refused:
            load()
        message = str(refused.value)
        assert swapped in message and registered in message and "best.pt" in message, message

    # The info artifact rewritten to match: the version's tag still holds the registered hash
    info_file.write_text(info_file.read_text().replace(registered, swapped))
    with pytest.raises(CheckpointError, match=f"{swapped} does not match {registered} recorded in the "
                                              f"`checkpoint_sha256` tag of {cfg.mlflow.registered_model} version 1"):
        load_registered(cfg, "1")


def test_register_command_registers_a_checkpoint_once(cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    checkpoint = save_model(cfg, tmp_path / "best.pt", seed=2)
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"miou": 0.52, "fb_iou": 0.7}')
    name = f"{cfg.mlflow.registered_model}-cli"
    argv = ["register", "--params", "none", "--set", f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}",
            "--set", f"mlflow.artifact_location={cfg.mlflow.artifact_location}",
            "--set", f"mlflow.experiment={cfg.mlflow.experiment}", "--checkpoint", str(checkpoint), "--name", name]
    assert main([*argv, "--metrics", str(metrics)]) == 0
    assert capsys.readouterr().out.strip() == f"{checkpoint}: models:/{name}/1 registered (run " \
        f"{client_for(cfg).get_model_version(name, '1').run_id})"
    version = client_for(cfg).get_model_version(name, "1")
    assert {"metric.miou": "0.52", "metric.fb_iou": "0.7", "fold": "0", "shot": "1", "method": "bam",
            "dataset": cfg.data.dataset, "status": "candidate",
            "checkpoint_sha256": file_sha256(checkpoint)}.items() <= version.tags.items()
    assert client_for(cfg).get_run(version.run_id).data.metrics == {"miou": 0.52, "fb_iou": 0.7}

    assert main([*argv, "--metrics", str(metrics)]) == 0  # idempotent: the same file, the same version
    assert capsys.readouterr().out.strip().startswith(f"{checkpoint}: models:/{name}/1 already registered")
    assert len(client_for(cfg).search_model_versions(f"name = '{name}'")) == 1
    named = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"registered_model": name})})
    assert load_registered(named, "1").predict(pd.DataFrame([request_row(0)]))[0]["height"] == 50

    metrics.write_text('{"miou": "high"}')
    assert main([*argv, "--metrics", str(metrics)]) == 2
    assert "expected a JSON object of metric names to numbers" in capsys.readouterr().err
    assert main([*argv[:-3], str(tmp_path / "none.pt"), "--name", name]) == 2
    assert "none.pt: checkpoint not found" in capsys.readouterr().err


def test_promotion_moves_aliases_only_on_a_real_win(cfg: Config, tmp_path: Path):
    from fssmeta.integrations.promotion import PromotionRefused, promote, rollback

    name = cfg.mlflow.registered_model
    for seed in range(3):
        register_model(cfg, checkpoint=save_model(cfg, tmp_path / f"v{seed}.pt", seed=seed), metrics={"miou": 0.1},
                       tags={}, fold=0, shot=1, base_classes=BASE_CLASSES)
    scores = {"1": 0.40, "2": 0.50, "3": 0.503}  # min_improvement 0.005: version 3 wins by too little
    client = client_for(cfg)

    def champion(domain: str) -> str:
        return str(client.get_model_version_by_alias(name, f"champion-{domain}").version)

    first = promote(cfg, domain="gray", version="1", score=scores.__getitem__)
    assert first.promoted and first.reason == "no champion yet" and champion("gray") == "1"
    better = promote(cfg, domain="gray", version="2", score=scores.__getitem__)
    assert better.promoted and (better.champion, better.champion_score) == ("1", 0.40) and champion("gray") == "2"
    within = promote(cfg, domain="gray", version="3", score=scores.__getitem__)
    assert not within.promoted and "< min_improvement 0.005" in within.reason and champion("gray") == "2"
    tags = client.get_model_version(name, "3").tags
    assert tags["promotion.gray.decision"] == "rejected" and tags["promotion.gray.score"] == "0.503"
    assert (tags["promotion.gray.champion_version"], tags["promotion.gray.champion_score"]) == ("2", "0.5")
    worse = promote(cfg, domain="gray", version="1", score=scores.__getitem__)
    assert not worse.promoted and champion("gray") == "2"

    scores["3"] = float("nan")
    with pytest.raises(PromotionRefused, match="challenger's score is nan"):
        promote(cfg, domain="gray", version="3", score=scores.__getitem__)
    assert champion("gray") == "2" and client.get_model_version(name, "3").tags["promotion.gray.decision"] == "refused"
    scores.update({"2": float("nan"), "3": 0.9})  # a champion that can no longer be scored: refused as well
    with pytest.raises(PromotionRefused, match="champion's score is nan"):
        promote(cfg, domain="gray", version="3", score=scores.__getitem__)
    assert champion("gray") == "2"

    assert promote(cfg, domain="hazy", version="3", score=scores.__getitem__).promoted  # domains are separate
    assert (champion("hazy"), champion("gray")) == ("3", "2")
    assert rollback(cfg, domain="gray") == "1" and champion("gray") == "1"
    with pytest.raises(PromotionRefused, match="no previous champion-gray"):
        rollback(cfg, domain="gray")
    assert champion("gray") == "1"

    # versions of another shot (or, on `source`, another fold) are scored on other episodes: refused
    shot5 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"shot": 5})})
    register_model(shot5, checkpoint=save_model(shot5, tmp_path / "v5.pt", seed=5), metrics={}, tags={}, fold=0,
                   shot=5, base_classes=BASE_CLASSES)
    scores["4"] = 0.99
    with pytest.raises(PromotionRefused, match="would not be scored on the same gray episodes"):
        promote(cfg, domain="gray", version="4", score=scores.__getitem__)
    assert champion("gray") == "1" and client.get_model_version(name, "4").tags["promotion.gray.decision"] == "refused"
