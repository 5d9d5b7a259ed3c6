"""Serving against real processes: an MLflow tracking server (sqlite + proxied artifacts) holding two registered
versions, per-domain promotion through it, and `mlflow models serve` of `champion-source` answering HTTP
segmentation requests (200 for valid ones, 4xx naming the problem for bad ones, alive afterwards)."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fssmeta.config import Config, MlflowConfig
from fssmeta.predict import foreground_mask, load_checkpoint_model, segment_arrays
from tests.mlflow_helpers import (
    BASE_CLASSES,
    decode_png,
    episode_arrays,
    png_base64,
    request_row,
    save_model,
    tiny_config,
)
from tests.net import free_port

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read once, when mlflow is imported

from mlflow import MlflowClient  # noqa: E402

from fssmeta.integrations.promotion import PromotionRefused, promote, rollback  # noqa: E402
from fssmeta.integrations.registry import register_model  # noqa: E402

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]

MAX_PIXELS = 10_000  # FSSMETA_MAX_IMAGE_PIXELS of the served model: the valid requests stay below it
SCORES = {"1": 0.40, "2": 0.50}


def baseline(version: str) -> float:
    """The non-learned baseline on the versions' episodes (same fold and shot): both clear that floor."""
    return 0.10


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        state, _, pgrp = text.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(f"{stat.parent.name} {text[: text.rfind(')') + 1]}")
    return members


def group_gone(process: subprocess.Popen, pgid: int, seconds: float) -> bool:
    """Wait up to `seconds` for every process of the group to exit (reaping the leader meanwhile)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        process.poll()
        if not group_members(pgid):
            return True
        time.sleep(0.2)
    return False


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group, wait, SIGKILL what is left; assert nothing of the group survives."""
    pgid = process.pid  # a session leader: its pid is the group id
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:  # nothing left to signal
            break
        if group_gone(process, pgid, grace):
            break
    process.wait(timeout=10)
    assert not group_members(pgid), f"processes of group {pgid} left: {group_members(pgid)}"


@contextmanager
def service(args: list[str], *, env: dict[str, str], ready_url: str, log: Path, timeout: float,
            cwd: Path) -> Iterator[subprocess.Popen]:
    """Run `args` in its own process group until `ready_url` answers 200; stop the whole group after."""
    with open(log, "wb") as out:
        process = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"{args[2:5]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready_url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield process
    finally:
        stop_group(process)


def service_env(**extra: str) -> dict[str, str]:
    """This environment with its bin folder first on PATH (`mlflow models serve` execs `uvicorn` from PATH)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PATH": path, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The module's folder, also the working directory: nothing may land in ./mlruns."""
    path = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield path
    assert not (path / "mlruns").exists()


@pytest.fixture(scope="module")
def server(workdir: Path) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, artifacts proxied into the module folder); its URL."""
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
            "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with service(args, env=service_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), ready_url=f"{url}/health",
                 log=workdir / "server.log", timeout=60, cwd=workdir):
        yield url


@pytest.fixture(scope="module")
def registry(server: str, workdir: Path) -> tuple[Config, dict[str, Path]]:
    """Two versions (other weights) of one registered model on the server; their checkpoints by version."""
    cfg = tiny_config(mlflow=MlflowConfig(tracking_uri=server, artifact_location="", experiment="serving",
                                          registered_model="fss-serving"))
    checkpoints = {}
    for seed in (0, 1):
        checkpoint = save_model(cfg, workdir / f"v{seed}.pt", seed=seed)
        result = register_model(cfg, checkpoint=checkpoint, metrics={"miou": 0.1}, tags={}, fold=0, shot=1,
                                base_classes=BASE_CLASSES)
        checkpoints[result["version"]] = checkpoint
    assert sorted(checkpoints) == ["1", "2"]
    return cfg, checkpoints


@pytest.fixture(scope="module")
def served(registry: tuple[Config, dict[str, Path]], server: str, workdir: Path) -> Iterator[str]:
    """`champion-source` (version 2, promoted over version 1) served by `mlflow models serve`; its URL."""
    cfg, _ = registry
    for version in ("1", "2"):
        assert promote(cfg, domain="source", version=version, score=SCORES.__getitem__, baseline=baseline).promoted
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/fss-serving@champion-source",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = service_env(MLFLOW_TRACKING_URI=server, FSSMETA_MAX_IMAGE_PIXELS=str(MAX_PIXELS))
    url = f"http://127.0.0.1:{port}"
    with service(args, env=env, ready_url=f"{url}/ping", log=workdir / "serve.log", timeout=120, cwd=workdir):
        yield url


def post(url: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    """POST to /invocations; (status, parsed JSON body, or the raw text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_promotion_through_the_server(registry: tuple[Config, dict[str, Path]]):
    cfg, _ = registry
    client = MlflowClient(cfg.mlflow.tracking_uri)
    scores = dict(SCORES)

    def champion() -> str:
        return str(client.get_model_version_by_alias("fss-serving", "champion-gray").version)

    assert promote(cfg, domain="gray", version="1", score=scores.__getitem__,
                   baseline=baseline).reason == "no champion yet"
    better = promote(cfg, domain="gray", version="2", score=scores.__getitem__, baseline=baseline)
    assert better.promoted and better.champion == "1" and champion() == "2"
    worse = promote(cfg, domain="gray", version="1", score=scores.__getitem__, baseline=baseline)
    assert not worse.promoted and champion() == "2"
    assert client.get_model_version("fss-serving", "1").tags["promotion.gray.decision"] == "rejected"
    scores["1"] = math.nan
    with pytest.raises(PromotionRefused, match="challenger's score is nan"):
        promote(cfg, domain="gray", version="1", score=scores.__getitem__, baseline=baseline)
    assert champion() == "2"
    assert rollback(cfg, domain="gray") == "1" and champion() == "1"


def test_the_served_champion_segments(served: str, registry: tuple[Config, dict[str, Path]]):
    rows = [request_row(0), request_row(1, query_shape=(64, 30), support_shape=(45, 55))]
    status, body = post(served, {"dataframe_records": rows[:1]})
    assert status == 200, body
    [prediction] = body["predictions"]
    mask, prob = decode_png(prediction["mask"]), decode_png(prediction["foreground_probability"])
    assert (mask.mode, mask.size, prob.mode, prob.size) == ("L", (70, 50), "L", (70, 50))  # PIL: (width, height)
    mask = np.asarray(mask)
    assert set(np.unique(mask)) <= {0, 255}
    assert (prediction["height"], prediction["width"]) == (50, 70)
    assert prediction["foreground_fraction"] == pytest.approx((mask == 255).mean())

    # The served model is version 2 (champion-source): the same mask as its checkpoint gives here.
    cfg, checkpoints = registry
    model, model_cfg = load_checkpoint_model(checkpoints["2"], {"shot": 1, "base_classes": BASE_CLASSES})
    query, support, support_mask = episode_arrays(0)
    local = segment_arrays(model, model_cfg, 1, query, [support], [(support_mask > 0).astype(np.uint8)])
    assert np.array_equal(mask == 255, foreground_mask(local).astype(bool))

    columns = list(rows[0])
    split = {"columns": columns, "data": [[row[c] for c in columns] for row in rows]}
    status, body = post(served, {"dataframe_split": split})
    assert status == 200, body
    assert [(p["height"], p["width"]) for p in body["predictions"]] == [(50, 70), (64, 30)]
    assert body["predictions"][0] == prediction


def _bad(seed: int = 0, **changes: Any) -> dict[str, Any]:
    return {"dataframe_records": [{**request_row(seed), **changes}]}


def _without(column: str) -> dict[str, Any]:
    return {"dataframe_records": [{k: v for k, v in request_row(0).items() if k != column}]}


_, _SUPPORT, _MASK = episode_arrays(0)
BAD_REQUESTS: dict[str, tuple[Callable[[], dict[str, Any] | bytes], list[str]]] = {
    "undecodable image": (lambda: _bad(query_img="not an image"),
                          ["row 0 query_img", "not a base64-encoded PNG or JPEG image"]),
    "base64 of no image": (lambda: _bad(support_imgs=[base64.b64encode(b"GIF89a...").decode()]),
                           ["row 0 support_imgs[0]", "not a base64-encoded PNG or JPEG image"]),
    "mask size mismatch": (lambda: _bad(support_masks=[png_base64(_MASK[:30, :30])]),
                           ["support_masks[0]", "30x30", "40x60"]),
    "too large": (lambda: _bad(query_img=png_base64(np.zeros((120, 120, 3), np.uint8))),
                  ["row 0 query_img", "too large", "14400", str(MAX_PIXELS)]),
    "zero supports": (lambda: _bad(support_imgs=[], support_masks=[]), ["no support image", "1-shot"]),
    "empty mask": (lambda: _bad(support_masks=[png_base64(np.zeros_like(_MASK))]),
                   ["support_masks[0]", "no foreground pixel"]),
    "wrong support count": (lambda: _bad(support_imgs=[png_base64(_SUPPORT)] * 2,
                                         support_masks=[png_base64(_MASK)] * 2), ["1-shot model", "got 2"]),
    "missing column": (lambda: _without("support_masks"), ["missing column(s) support_masks"]),
    "unknown columns": (lambda: _bad(mask_url="x", note="y"),
                        ["unknown column(s) mask_url, note",
                         "expected query_img, support_imgs, support_masks, optionally mask_threshold, mask_class, ways"]),
    "a string for a list": (lambda: _bad(support_imgs=png_base64(_SUPPORT)), ["support_imgs"]),
    "too many rows": (lambda: {"dataframe_records": [request_row(0)] * 9},
                      ["9 rows, at most 8 per request allowed (FSSMETA_MAX_REQUEST_ROWS)"]),
    "a mask class the mask lacks": (lambda: _bad(mask_class=9), ["row 0 support_masks[0]: mask class 9 is not in the mask"]),
    "malformed JSON": (lambda: b'{"dataframe_records": [{"query_img": ', ["valid JSON"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_client_errors(served: str, case: str):
    make, expected = BAD_REQUESTS[case]
    status, body = post(served, make())
    assert 400 <= status < 500, (status, body)
    message = body["message"] if isinstance(body, dict) else body
    for part in expected:
        assert part in message, f"{case}: {part!r} not in {message[-600:]!r}"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_a_request_that_is_not_declared_json_is_refused_by_mlflow(served: str, content_type: str | None):
    """MLflow's scoring server, not ours: no Content-Type header is a 500 (it splits a None header), curl's
    default form type a 415 (docs/serving.md). If MLflow answers 4xx to both one day, update the docs."""
    host, port = served.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {} if content_type is None else {"Content-Type": content_type}
    connection.request("POST", "/invocations", body=json.dumps({"dataframe_records": [request_row(0)]}),
                       headers=headers)  # http.client adds no Content-Type of its own
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    expected = ((500, "Internal Server Error") if content_type is None else
                (415, f"This predictor only supports the following content types: Types: ['text/csv', "
                      f"'application/json', 'application/vnd.apache.parquet']. Got '{content_type}'."))
    assert (response.status, body) == expected


def test_the_server_survives_bad_requests(served: str):
    status, body = post(served, {"dataframe_records": [request_row(2)]})
    assert status == 200 and len(body["predictions"]) == 1
