"""infra/: the `ray up` config against Ray's own schema and validation, the KubeRay and docker-compose files'
shape, the scripts' command line; and (integration) a two-node Ray cluster and a PostgreSQL-backed MLflow
server started by infra/local, a 2-worker training run on them tracked over HTTP, and a teardown that leaves
no process of ours running and every other one alone."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from fssmeta.checkpoint import read_checkpoint
from fssmeta.integrations.ray_train import train_with_ray
from tests.integration.ray_workspace import make_config
from tests.net import free_port

INFRA = Path(__file__).resolve().parents[2] / "infra"
SCRIPTS = sorted((INFRA / "local").glob("*.sh"))
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict[str, Any]) -> None:
    """What `ray up` checks before it talks to the cloud: the raw file against Ray's JSON schema, then the
    config merged with the provider's defaults through Ray's own validation."""
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))


# ------------------------------------------------------------------------------------------ unit tier


def test_ray_up_config_passes_rays_validation():
    config = load_yaml(INFRA / "ray" / "cluster-aws.yaml")
    ray_validate(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["node_config"]["InstanceType"].startswith("m")  # CPU head
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU workers
    assert config["docker"]["head_image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert config["docker"]["worker_image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert config["docker"]["worker_image"].endswith("-gpu")
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        torch_first = [i for i, c in enumerate(commands) if "torch==2.13.0" in c]
        project = [i for i, c in enumerate(commands) if "-c ~/fssmeta/constraints.txt -e ~/fssmeta" in c]
        assert torch_first and project and torch_first[0] < project[0], commands
    assert "whl/cpu" in config["head_setup_commands"][0] and "whl/cpu" not in config["worker_setup_commands"][0]


@pytest.mark.parametrize("breakage", ["unknown key", "wrong type", "head type not a node type", "no provider",
                                      "min over max workers"])
def test_a_broken_ray_up_config_fails_validation(breakage):
    config = load_yaml(INFRA / "ray" / "cluster-aws.yaml")
    if breakage == "unknown key":
        config["max_worker"] = 4
    elif breakage == "wrong type":
        config["max_workers"] = "four"
    elif breakage == "head type not a node type":
        config["head_node_type"] = "cpu_head"
    elif breakage == "no provider":
        del config["provider"]
    else:
        config["available_node_types"]["gpu_worker"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        ray_validate(config)


def test_kuberay_manifests_declare_the_cluster_and_the_training_job():
    documents = [d for path in sorted((INFRA / "ray" / "kuberay").glob("*.yaml"))
                 for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"]: d for d in documents}
    assert set(kinds) == {"PersistentVolumeClaim", "RayCluster", "RayJob"}
    assert kinds["PersistentVolumeClaim"]["apiVersion"] == "v1"
    cluster, job = kinds["RayCluster"], kinds["RayJob"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    workers = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the shared volume is mounted at the same project paths in every pod
    mounts = [{m["mountPath"] for m in spec["containers"][0]["volumeMounts"]} for spec in (head, workers)]
    assert mounts[0] == mounts[1] and "/home/ray/fssmeta/ray_results" in mounts[0]
    claim = {v["persistentVolumeClaim"]["claimName"] for v in head["volumes"] if "persistentVolumeClaim" in v}
    assert claim == {kinds["PersistentVolumeClaim"]["metadata"]["name"]}
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "dvc exp run train_meta" in job["spec"]["entrypoint"] and "ray.address=auto" in job["spec"]["entrypoint"]


def test_team_server_compose_uses_postgres_and_an_s3_artifact_store():
    compose = load_yaml(INFRA / "mlflow" / "docker-compose.yml")
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    command = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg2://" in command and "--artifacts-destination=s3://" in command
    environment = services["mlflow"]["environment"]
    assert environment["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")
    assert environment["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert ":" not in command.split("postgresql+psycopg2://")[1].split("@")[0]  # no password on the command line


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INFRA / "local" / name), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name", [s.name for s in SCRIPTS if s.name != "common.sh"])
def test_scripts_explain_their_usage_and_stop_idempotently(name, tmp_path):
    assert run_script(name, "--help").stdout.startswith(f"Usage: infra/local/{name} up|down|status")
    wrong = run_script(name, "restart")
    assert wrong.returncode == 2 and "expected up, down or status" in wrong.stderr
    unknown = run_script(name, "up", "--bogus", "1")
    assert unknown.returncode == 2 and "unknown option --bogus" in unknown.stderr
    assert run_script(name, "up", "--port", "x").returncode == 1
    # nothing started from this dir: down succeeds and does nothing, status says "down"
    down = run_script(name, "down", "--dir", str(tmp_path))
    assert down.returncode == 0 and "nothing to stop" in down.stderr
    assert run_script(name, "status", "--dir", str(tmp_path)).returncode == 3


# ------------------------------------------------------------------------------------ integration tier


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [0] state, [1] ppid, [3] session id, [19] start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def live_processes() -> dict[int, tuple[str, str, str]]:
    """pid -> (session id, start time, command line) of every process that is not a zombie."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and stat[0] != "Z":
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[int(entry.name)] = (stat[3], stat[19], cmdline)
    return found


def recorded(pids_file: Path) -> dict[str, tuple[int, str]]:
    """A script's pids file: name -> (pid, start time)."""
    return {name: (int(pid), start) for name, pid, start in
            (line.split() for line in pids_file.read_text().splitlines())}


@pytest.fixture
def bystanders(tmp_path) -> Iterator[list[subprocess.Popen]]:
    """Processes of "another" Ray on this machine, which nothing of ours may touch: named as `ray stop` and
    `pkill raylet` find Ray's (process names raylet and gcs_server, a `ray::IDLE` worker), and one whose
    command line makes Ray's own discovery ("auto") see a second cluster."""
    processes = []
    for name in ("raylet", "gcs_server", "ray::IDLE"):
        binary = tmp_path / "bystanders" / name
        binary.parent.mkdir(exist_ok=True)
        shutil.copy(shutil.which("sleep"), binary)
        processes.append(subprocess.Popen([str(binary), "600"], start_new_session=True))
    processes.append(subprocess.Popen(["raylet", "-c", "import time; time.sleep(600)", "--gcs-address=10.255.0.1:6379"],
                                      executable=sys.executable, start_new_session=True))
    yield processes
    for process in processes:
        process.kill()
        process.wait()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """The scripts' state folder: short (Ray's socket paths) and reachable by the postgres user (pytest's
    tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fssmeta-infra-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.integration
def test_training_on_a_local_cluster_tracked_on_the_team_server(workspace, ray_env, tmp_path, state_dir,
                                                                bystanders):
    from mlflow.tracking import MlflowClient

    ray_dir, mlflow_dir = state_dir / "ray", state_dir / "mlflow"
    ray_port, mlflow_port = free_port(), free_port()
    # Both services start at once: their start-up is mostly waiting.
    cluster_up = subprocess.Popen(["bash", str(INFRA / "local" / "ray-cluster.sh"), "up", "--workers", "1",
                                   "--cpus-per-node", "1", "--object-store-mb", "100", "--port", str(ray_port),
                                   "--dir", str(ray_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server_up = subprocess.Popen(["bash", str(INFRA / "local" / "mlflow-server.sh"), "up", "--port", str(mlflow_port),
                                  "--dir", str(mlflow_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sessions: dict[str, tuple[int, str]] = {}
    try:
        address, log = cluster_up.communicate(timeout=300)
        assert cluster_up.returncode == 0, log
        url, log = server_up.communicate(timeout=300)
        assert server_up.returncode == 0, log
        address, url = address.strip(), url.strip()
        assert url == f"http://127.0.0.1:{mlflow_port}" and address.endswith(f":{ray_port}")
        sessions = recorded(ray_dir / "pids") | recorded(mlflow_dir / "pids")
        assert set(sessions) == {"head", "worker-1", "postgres", "mlflow"}

        status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status", "--address", address],
                                capture_output=True, text=True, timeout=60)
        active = status.stdout.split("Active:")[1].split("Pending:")[0]
        assert active.count(" node_") == 2, status.stdout

        ray.init(address=address, log_to_driver=False)
        try:
            alive = [n for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2 and all(n["Resources"]["CPU"] == 1.0 for n in alive)
            cfg = make_config(workspace, tmp_path, mlflow=True, **{
                "ray.address": address, "mlflow.tracking_uri": url, "mlflow.artifact_location": "",
                "mlflow.experiment": "infra-test"})
            start = time.monotonic()
            result = train_with_ray(cfg, progress=False)
            print(f"2-worker training on the cluster: {time.monotonic() - start:.1f} s")
        finally:
            ray.shutdown()  # the driver leaves before the cluster goes

        assert result.metrics["epoch"] == 2 and result.metrics["step"] == 8
        # one training worker ran on each node: each node's own logs name a RayTrainWorker
        temp_root = Path((ray_dir / "temp_root").read_text().strip())
        for node in ("head", "worker-1"):
            logs = {p: p.read_text(errors="replace") for p in (temp_root / node).glob("session_*/logs/worker-*")}
            assert any("RayTrainWorker" in text for text in logs.values()), node
            # Ray Train's placement-group cleaner found its cluster despite the second one (RAY_ADDRESS)
            assert not [p for p, text in logs.items() if "Found multiple active Ray instances" in text], node

        client = MlflowClient(url)
        run = client.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == result.name
        assert run.data.params["ray.num_workers"] == "2" and run.data.params["ray.address"] == address
        assert run.data.tags["ray_run"] == result.name
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")] == [4, 8]
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # the server's store
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/best.pt"]
        best = Path(client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(tmp_path)))
        assert read_checkpoint(best)["extra"]["history"][-1]["val_miou"] == pytest.approx(result.best_val_miou)
        # ... stored under the server's artifact root, and the run itself in PostgreSQL
        assert list((mlflow_dir / "artifacts").glob(f"*/{run.info.run_id}/artifacts/checkpoint/best.pt"))
        assert postgres_run_status(mlflow_dir, run.info.run_id) == "FINISHED"
    finally:
        for process in (cluster_up, server_up):
            if process.poll() is None:  # a start-up that hangs: its own trap stops what it started
                process.terminate()
                process.wait(timeout=60)
        down = [run_script("ray-cluster.sh", "down", "--dir", str(ray_dir)),
                run_script("mlflow-server.sh", "down", "--dir", str(mlflow_dir))]
    assert all(d.returncode == 0 for d in down), [d.stderr for d in down]

    left = live_processes()
    ours = {pid: cmd for pid, (sid, _, cmd) in left.items()
            if int(sid) in {pid for pid, _ in sessions.values()} or str(state_dir) in cmd}
    assert not ours, ours  # nothing of any recorded session, nothing naming our state folder
    postmaster = sessions["postgres"][0]
    assert postmaster not in left or left[postmaster][1] != sessions["postgres"][1]
    # the bystanders were left alone
    assert all(p.poll() is None for p in bystanders)


def postgres_run_status(mlflow_dir: Path, run_id: str) -> str:
    """The run's status read straight from the server's PostgreSQL (as the server's own role)."""
    import psycopg2

    port = int((mlflow_dir / "pg_port").read_text())
    with psycopg2.connect(host="127.0.0.1", port=port, dbname="mlflow", user="mlflow",
                          passfile=str(mlflow_dir / "pgpass")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        return cursor.fetchone()[0]
