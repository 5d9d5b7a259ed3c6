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
                                              r"mask_class, ways\)") as failure:
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
    baselines = {"1": 0.10, "2": 0.10, "3": 0.10, "4": 0.10}  # the non-learned baseline: every version clears it

    def floor(version: str) -> float:
        return baselines[version]
    client = client_for(cfg)

    def champion(domain: str) -> str:
        return str(client.get_model_version_by_alias(name, f"champion-{domain}").version)

    first = promote(cfg, domain="gray", version="1", score=scores.__getitem__, baseline=floor)
    assert first.promoted and first.reason == "no champion yet" and champion("gray") == "1"
    better = promote(cfg, domain="gray", version="2", score=scores.__getitem__, baseline=floor)
    assert better.promoted and (better.champion, better.champion_score) == ("1", 0.40) and champion("gray") == "2"
    within = promote(cfg, domain="gray", version="3", score=scores.__getitem__, baseline=floor)
    assert not within.promoted and "< min_improvement 0.005" in within.reason and champion("gray") == "2"
    tags = client.get_model_version(name, "3").tags
    assert tags["promotion.gray.decision"] == "rejected" and tags["promotion.gray.score"] == "0.503"
    assert (tags["promotion.gray.champion_version"], tags["promotion.gray.champion_score"]) == ("2", "0.5")
    assert (tags["promotion.gray.baseline_score"], tags["promotion.gray.episodes"]) == ("0.1", "target-validation:gray")
    worse = promote(cfg, domain="gray", version="1", score=scores.__getitem__, baseline=floor)
    assert not worse.promoted and champion("gray") == "2"

    scores["3"] = float("nan")
    with pytest.raises(PromotionRefused, match="challenger's score is nan"):
        promote(cfg, domain="gray", version="3", score=scores.__getitem__, baseline=floor)
    assert champion("gray") == "2" and client.get_model_version(name, "3").tags["promotion.gray.decision"] == "refused"
    scores.update({"2": float("nan"), "3": 0.9})  # a champion that can no longer be scored: refused as well
    with pytest.raises(PromotionRefused, match="champion's score is nan"):
        promote(cfg, domain="gray", version="3", score=scores.__getitem__, baseline=floor)
    assert champion("gray") == "2"

    assert promote(cfg, domain="hazy", version="3", score=scores.__getitem__, baseline=floor).promoted  # domains are separate
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
        promote(cfg, domain="gray", version="4", score=scores.__getitem__, baseline=floor)
    assert champion("gray") == "1" and client.get_model_version(name, "4").tags["promotion.gray.decision"] == "refused"


def test_no_champion_below_the_non_learned_baseline(cfg: Config, tmp_path: Path):
    """The floor: a version must beat the non-learned baseline on the same selection episodes to take
    `champion-<domain>`, the first champion included; the baseline's score is recorded beside the decision."""
    from fssmeta.integrations.promotion import PromotionRefused, promote

    name = cfg.mlflow.registered_model
    for seed in range(3):
        register_model(cfg, checkpoint=save_model(cfg, tmp_path / f"v{seed}.pt", seed=seed), metrics={}, tags={},
                       fold=0, shot=1, base_classes=BASE_CLASSES)
    client = client_for(cfg)
    scores = {"1": 0.0, "2": 0.31, "3": 0.29}  # version 1 learned nothing
    baseline = {"1": 0.30, "2": 0.30, "3": 0.30}  # the same fold and shot: the same baseline

    def aliases() -> dict[str, str]:
        return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}

    nothing = promote(cfg, domain="source", version="1", score=scores.__getitem__, baseline=baseline.__getitem__)
    assert not nothing.promoted and nothing.champion is None and aliases() == {}  # even with no champion yet
    assert "below the non-learned baseline" in nothing.reason and nothing.baseline_score == 0.30
    assert nothing.episodes == "source-validation"
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion.source.decision"] == "rejected" and tags["promotion.source.baseline_score"] == "0.3"
    assert "below the non-learned baseline" in tags["promotion.source.reason"]

    first = promote(cfg, domain="source", version="2", score=scores.__getitem__, baseline=baseline.__getitem__)
    assert first.promoted and first.reason == "no champion yet" and aliases() == {"champion-source": "2"}
    assert client.get_model_version(name, "2").tags["promotion.source.baseline_score"] == "0.3"
    # winning over the champion does not lift the floor: 0.29 beats the champion's 0.0, not the baseline's 0.305
    scores["2"] = 0.0
    baseline["3"] = 0.305
    beaten = promote(cfg, domain="source", version="3", score=scores.__getitem__, baseline=baseline.__getitem__)
    assert not beaten.promoted and "below the non-learned baseline" in beaten.reason
    assert aliases() == {"champion-source": "2"}
    baseline["3"] = 0.2
    assert promote(cfg, domain="source", version="3", score=scores.__getitem__, baseline=baseline.__getitem__).promoted
    assert aliases() == {"champion-source": "3"}

    baseline["1"] = float("nan")  # a floor that cannot be computed refuses: nothing moves
    with pytest.raises(PromotionRefused, match="non-learned baseline's score is nan"):
        promote(cfg, domain="gray", version="1", score=scores.__getitem__, baseline=baseline.__getitem__)
    assert client.get_model_version(name, "1").tags["promotion.gray.decision"] == "refused"
    off = cfg.model_copy(update={"episodes": cfg.episodes.model_copy(update={"target_val_fraction": 0.0})})
    with pytest.raises(PromotionRefused, match="episodes.target_val_fraction is 0: target gray has no selection"):
        promote(off, domain="gray", version="2", score=scores.__getitem__, baseline=baseline.__getitem__)
    assert aliases() == {"champion-source": "3"}


def test_promotion_scores_the_baseline_on_the_targets_selection_episodes(cfg: Config, tmp_path: Path):
    """Real scores, no stand-ins: a registered version and the non-learned baseline scored on a target's
    selection lists (written by the episodes stage); its test lists are never read."""
    import torch

    from fssmeta.checkpoint import save_checkpoint
    from fssmeta.cross_domain import score_domain
    from fssmeta.integrations.promotion import promote, score_baseline, score_version
    from fssmeta.models.pspnet import build_pspnet
    from fssmeta.params import load_config
    from fssmeta.runs import evaluation_model

    root = tmp_path / "data"
    sets = {"synthesize.out": root / "syn", "synthesize.image_size": 96, "synthesize.train_images": 100,
            "synthesize.test_images": 40, "synthesize.val_images": 30, "synthesize.target_images_per_class": 6,
            "data.root": root / "syn", "data.prepared": root / "prepared", "data.cache_dir": root / "cache",
            "data.targets": f"{{hazy: {{layout: fss1000, root: {root}/syn/targets/hazy}}}}",
            "data.min_object_pixels": 400, "episodes.out": root / "episodes", "episodes.folds": "[0]",
            "episodes.shots": "[1]", "episodes.orders": "[image]", "episodes.test_episodes": 8,
            "episodes.test_seeds": "[0]", "episodes.val_episodes": 8}
    args = [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
    for stage in ("synthesize", "prepare", "episodes"):
        assert main([stage, "--params", "none", "--quiet", *args]) == 0, stage
    data = load_config(None, [f"{key}={value}" for key, value in sets.items()])
    # The baseline borrows the fold's stage-1 encoder (no ImageNet weights here): a seeded one, as train-base writes
    scored = cfg.model_copy(update={"data": data.data, "episodes": data.episodes,
                                    "eval": cfg.eval.model_copy(update={"resized_size": 65}),
                                    "model": cfg.model.model_copy(update={"backbone_source": "stage1"}),
                                    "train": cfg.train.model_copy(update={"out": str(tmp_path / "runs")}),
                                    "train_base": cfg.train_base.model_copy(update={"out": str(tmp_path / "runs")})})
    (tmp_path / "runs" / "fold0" / "base").mkdir(parents=True)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "runs" / "fold0" / "base" / "best.pt", config=config_to_dict(scored),
                    model=build_pspnet(scored.model, 1 + len(BASE_CLASSES)))
    name = cfg.mlflow.registered_model
    register_model(scored, checkpoint=save_model(scored, tmp_path / "v.pt", seed=0), metrics={}, tags={}, fold=0,
                   shot=1, base_classes=BASE_CLASSES)
    for path in (root / "episodes" / "targets" / "hazy").glob("test_*.json"):
        path.write_text("not an episode list")  # promotion must never read a test list

    decision = promote(scored, domain="hazy", version="1",
                       score=lambda v: score_version(scored, version=v, domain="hazy", name=name))
    baseline = evaluation_model(scored, 0, 1, "baseline", torch.device("cpu"))
    expected = score_domain(scored, baseline, "hazy", fold=0, shot=1, method="baseline")
    assert decision.baseline_score == pytest.approx(expected) and 0.0 <= expected <= 1.0
    assert score_baseline(scored, version="1", domain="hazy") == pytest.approx(expected)
    assert decision.promoted == (decision.challenger_score > decision.baseline_score)
    assert decision.episodes == "target-validation:hazy"
    tags = client_for(scored).get_model_version(name, "1").tags
    assert tags["selection"] == "source-validation"  # the version's own: no sweep chose its values
    assert float(tags["promotion.hazy.baseline_score"]) == pytest.approx(expected)
