"""Integration: meta-training under real Ray Train on CPU workers — a 2-worker run tracked in MLflow and
published for `fssmeta evaluate`, a 1-worker run's console (its epoch lines, none of Ray's noise), DDP equal to one process with the same global batch, a killed worker
resumed from its checkpoint, a clear error once retries run out, and a lost node replaced mid-run."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from fssmeta.checkpoint import read_checkpoint
from fssmeta.integrations.ray_train import FAULT_MARKER, RayTrainingError, train_with_ray
from fssmeta.runs import fresh_model
from tests.integration.ray_workspace import make_config

pytestmark = pytest.mark.integration

HAS_MLFLOW = importlib.util.find_spec("fssmeta.integrations.mlflow") is not None


def test_two_workers_train_track_and_publish(workspace, ray_env, tmp_path):
    cfg = make_config(workspace, tmp_path, mlflow=HAS_MLFLOW)
    result = train_with_ray(cfg, progress=False)
    assert not ray.is_initialized()  # it started a local Ray and shut it down
    assert result.metrics["epoch"] == 2 and result.metrics["step"] == 8 and result.restored_epoch == 0
    assert 0.0 <= result.best_val_miou <= 1.0
    assert re.fullmatch(r"bam-fold0-1shot-\d{8}-\d{6}-[0-9a-f]{6}", result.name)
    assert Path(result.storage_path) == tmp_path / "ray_results" / result.name
    out = tmp_path / "runs" / "fold0" / "bam-1shot"
    assert Path(result.meta_dir) == out
    assert read_checkpoint(out / "last.pt")["epoch"] == 2
    best = read_checkpoint(out / "best.pt")
    assert best["extra"]["history"][-1]["val_miou"] == pytest.approx(result.best_val_miou)
    assert len((out / "history.json").read_text()) > 0
    if not HAS_MLFLOW:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == result.name
    assert run.data.params["train.batch_size"] == "2" and run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["fold"] == "0" and run.data.tags["ray_run"] == result.name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [4, 8]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/best.pt"]


def test_a_run_with_progress_shows_its_epoch_lines_and_none_of_rays_noise(workspace, ray_env, tmp_path, capfd):
    # What `fssmeta train --ray` and the train_meta stage print. Without the local dashboard, Train's
    # placement-group cleaner warns every second that the State API is unavailable; without the loop's own
    # quietening each report logs every metric again; the faiss import logs which build it loaded; Train's
    # preemption watcher (off for a local Ray) logs a core-worker error line at start-up.
    cfg = make_config(workspace, tmp_path, **{"ray.num_workers": 1})
    result = train_with_ray(cfg, progress=True)
    assert result.metrics["epoch"] == 2
    out, err = capfd.readouterr()
    console = out + err
    assert "epoch 1/2 (step 4): train_loss" in console
    for noise in ("Failed to query Ray Train Controller", "Reporting training result", "Loading faiss",
                  "PreemptionWatcher"):
        assert noise not in console, noise


def test_ddp_matches_one_process_with_the_same_global_batch(workspace, ray_env, tmp_path):
    # Same seed, no dropout and no augmentation that pads or rotates (both add ignored pixels, which make a
    # rank's mean loss weigh its pixels differently from the global mean): 2 workers x batch 2 and 1 worker
    # x batch 4 see the same episodes at every step, so DDP's averaged gradients equal the single batch's.
    same = {"model.bam.dropout": 0.0, "model.bam.feature_dropout": 0.0, "model.bam.base_dropout": False,
            "transform.scale_min": 1.0,
            "transform.scale_max": 1.0, "transform.rotate_degrees": 0.0, "train.epochs": 1, "train.val_episodes": 0}
    states = {}
    for workers, batch in ((2, 2), (1, 4)):
        run = tmp_path / f"w{workers}"
        cfg = make_config(workspace, run, **same, **{"ray.num_workers": workers, "train.batch_size": batch,
                                                     "train.episodes_per_epoch": 4 * batch})  # per rank: 4 steps
        result = train_with_ray(cfg, progress=False)
        assert result.metrics["step"] == 4
        states[workers] = read_checkpoint(Path(result.meta_dir) / "last.pt")["model"]
    torch.manual_seed(cfg.train.seed)  # what train_meta does before building the model
    initial = fresh_model(cfg, 0, 1).state_dict()
    trained = [k for k in initial if not torch.equal(initial[k], states[1][k])]
    assert trained, "one epoch changed no parameter: the comparison would prove nothing"
    for key in initial:
        assert torch.allclose(states[2][key], states[1][key], atol=1e-5), key


def test_a_killed_worker_resumes_from_its_checkpoint(workspace, ray_env, tmp_path):
    # 4 steps per epoch; rank 0 dies at step 10, inside epoch 3. Ray registers a report only at a later poll
    # of every worker, but a worker's second report waits for its first to be taken: epoch 1's checkpoint is
    # registered by then (epoch 2's may not be yet).
    cfg = make_config(workspace, tmp_path, mlflow=HAS_MLFLOW, **{"train.epochs": 3, "ray.max_failures": 2,
                                                                 "ray.fail_at_step": 10})
    result = train_with_ray(cfg, progress=False)
    assert (Path(result.storage_path) / FAULT_MARKER).is_file()  # the failure did happen
    assert result.metrics["epoch"] == 3 and result.metrics["step"] == 12
    assert result.restored_epoch >= 1
    assert read_checkpoint(Path(result.meta_dir) / "last.pt")["epoch"] == 3
    if HAS_MLFLOW:  # the restarted worker continued the first attempt's MLflow run
        from mlflow.tracking import MlflowClient

        client = MlflowClient(cfg.mlflow.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("ray-test").experiment_id])
        assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
        assert runs[0].info.status == "FINISHED"
        assert {m.step for m in client.get_metric_history(result.mlflow_run_id, "val_miou")} == {4, 8, 12}


def test_without_retries_a_failure_names_the_run(workspace, ray_env, tmp_path):
    cfg = make_config(workspace, tmp_path, **{"train.epochs": 1, "ray.max_failures": 0, "ray.fail_at_step": 2})
    with pytest.raises(RayTrainingError) as info:
        train_with_ray(cfg, progress=False)
    message = str(info.value)
    name = re.search(r"run (bam-fold0-1shot-\d{8}-\d{6}-[0-9a-f]{6}) failed", message)
    assert name, message
    run_dir = tmp_path / "ray_results" / name.group(1)
    assert str(run_dir) in message and (run_dir / FAULT_MARKER).is_file()
    assert "max_failures=0" in message and "Original error" in message
    assert not ray.is_initialized()


def registered_checkpoints(storage: Path) -> list[str]:
    """Checkpoints Ray's controller has registered (its snapshot), not merely uploaded by a worker."""
    names = []
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            names += [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
        except (ValueError, KeyError):  # being written
            pass
    return names


def test_multi_node_run_survives_losing_a_node(workspace, ray_env, tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        # 5 epochs of 8 steps: the node goes while most of the run is still ahead
        cfg = make_config(workspace, tmp_path, **{"train.epochs": 5, "train.episodes_per_epoch": 16,
                                                  "train.val_episodes": 0, "ray.address": cluster.address,
                                                  "ray.max_failures": 2})
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = train_with_ray(cfg, progress=False)
            except BaseException as exc:  # re-raised below, in the test's thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not registered_checkpoints(tmp_path / "ray_results"):
            assert thread.is_alive(), outcome.get("error")
            assert time.monotonic() < deadline, "no checkpoint registered within 120 s"
            time.sleep(0.1)
        # Signals: nodes are removed and added from the main thread, never from the training thread.
        cluster.remove_node(workers[1], allow_graceful=True)
        cluster.add_node(num_cpus=1)
        thread.join(timeout=180)
        assert not thread.is_alive(), "training did not finish within 180 s of the node loss"
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        assert result.metrics["epoch"] == 5 and result.metrics["step"] == 40 and result.restored_epoch >= 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
