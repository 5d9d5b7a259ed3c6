"""`fssmeta predict` and the decoding rules it shares with serving: the mask value rule, the pixel limit,
support validation, and the command on a training checkpoint and on a registered model (same outputs)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fssmeta.cli import main
from fssmeta.config import MlflowConfig
from fssmeta.data.io import voc_palette
from fssmeta.predict import (
    MAX_IMAGE_PIXELS,
    RequestError,
    check_supports,
    decode_base64,
    decode_image,
    max_image_pixels,
    overlay,
)
from fssmeta.runs import fold_base_classes
from tests.mlflow_helpers import BASE_CLASSES, encode, episode_arrays, save_model, tiny_config


def image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- decoding

def test_mask_value_rule():
    black_white = np.array([[0, 255], [255, 0]], np.uint8)
    assert decode_image(encode(black_white), "m", mask=True).tolist() == [[0, 1], [1, 0]]  # 255 alone: foreground
    pascal = np.array([[0, 1, 255], [0, 7, 255]], np.uint8)  # 255 beside other values: the ignore outline
    assert decode_image(encode(pascal), "m", mask=True).tolist() == [[0, 1, 255], [0, 1, 255]]
    palette = Image.fromarray(np.array([[0, 15], [255, 15]], np.uint8))
    palette.putpalette(voc_palette())  # a VOC SegmentationClass PNG: pixel values are class ids
    assert decode_image(image_bytes(palette), "m", mask=True).tolist() == [[0, 1], [255, 1]]
    binary = Image.fromarray(np.array([[False, True]])).convert("1")
    assert decode_image(image_bytes(binary), "m", mask=True).tolist() == [[0, 1]]
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 1] = (200, 0, 0)  # a colour mask: any non-black pixel is foreground
    assert decode_image(encode(colour), "m", mask=True).tolist() == [[0, 1], [0, 0]]
    wide = Image.fromarray(np.array([[0, 1000]], np.uint16)).convert("I;16")
    assert decode_image(image_bytes(wide), "m", mask=True).tolist() == [[0, 1]]
    big = np.zeros((32, 32), np.uint8)
    big[8:24, 8:24] = 255
    jpeg = decode_image(encode(big, "JPEG"), "m", mask=True)  # lossy: thresholded at 128, no ignore
    assert set(np.unique(jpeg)) == {0, 1} and (jpeg == (big > 0)).mean() > 0.97


def test_images_decode_to_rgb_and_bad_input_names_the_field():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = decode_image(encode(gray), "query")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8 and (rgb[..., 0] == gray).all()
    text = base64.b64encode(encode(gray)).decode()
    data_url = "data:image/png;base64," + "\n".join(text[i : i + 8] for i in range(0, len(text), 8))
    assert (decode_base64(data_url, "query") == rgb).all()
    for value in ("not base64!", base64.b64encode(b"GIF89a....").decode(), 42, ["x"]):
        with pytest.raises(RequestError, match=r"^row 3 query_img: not a base64-encoded PNG or JPEG image"):
            decode_base64(value, "row 3 query_img")
    truncated = encode(np.zeros((64, 64, 3), np.uint8))[:60]
    with pytest.raises(RequestError, match="query: not a PNG or JPEG image"):
        decode_image(truncated, "query")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by an empty pixel-data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", b"")


def test_pixel_limit_is_checked_from_the_header(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FSSMETA_MAX_IMAGE_PIXELS", raising=False)
    assert max_image_pixels() == MAX_IMAGE_PIXELS == 4096 * 4096
    with pytest.raises(RequestError, match="q: image too large: 5000x5000 = 25000000 pixels, at most 16777216"):
        decode_image(png_header_only(5000, 5000), "q")  # no pixels to decode: the header alone decides
    with pytest.raises(RequestError, match="q: image too large"):
        decode_image(png_header_only(100_000, 100_000), "q")  # beyond PIL's own decompression-bomb limit
    monkeypatch.setenv("FSSMETA_MAX_IMAGE_PIXELS", "200")  # read at call time
    assert decode_image(encode(np.zeros((10, 20), np.uint8)), "q").shape == (10, 20, 3)
    with pytest.raises(RequestError, match="225 pixels, at most 200 allowed"):
        decode_image(encode(np.zeros((15, 15), np.uint8)), "q")
    monkeypatch.setenv("FSSMETA_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="FSSMETA_MAX_IMAGE_PIXELS: expected a positive integer, got 'lots'"):
        max_image_pixels()


def test_support_checks_name_the_problem():
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[5:10, 5:10] = 1
    check_supports(2, [image, image], [mask, mask])
    with pytest.raises(RequestError, match="no support image given: this is a 1-shot model"):
        check_supports(1, [], [])
    with pytest.raises(RequestError, match="this is a 5-shot model: it takes 5 support image.s., got 2"):
        check_supports(5, [image, image], [mask, mask])
    with pytest.raises(RequestError, match="2 support image.s. but 1 support mask"):
        check_supports(2, [image, image], [mask])
    with pytest.raises(RequestError, match=r"support_masks\[1\]: the mask is 30x60 .* support image is 40x60"):
        check_supports(2, [image, image], [mask, mask[:30]])
    with pytest.raises(RequestError, match=r"support_masks\[0\]: the mask has no foreground pixel"):
        check_supports(1, [image], [np.where(mask == 1, 255, 0).astype(np.uint8)])  # only ignore
    with pytest.raises(RequestError, match="a.png: expected uint8 labels 0, 1 and 255"):
        check_supports(1, [image], [mask * 7], names=["a.png"])


def test_overlay_tints_the_foreground_and_draws_its_outline():
    query = np.full((6, 6, 3), 100, np.uint8)
    mask = np.zeros((6, 6), np.uint8)
    mask[1:5, 1:5] = 1
    out = overlay(query, mask)
    assert out[0, 0].tolist() == [100, 100, 100]  # background untouched
    assert out[2, 2].tolist() == [178, 50, 50]  # inside: 50% red
    assert out[1, 1].tolist() == [255, 255, 0]  # outline


def test_base_classes_come_from_the_prepared_list_when_it_is_this_datasets(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config()
    assert fold_base_classes(cfg, 0) == BASE_CLASSES  # no prepared lists: the protocol's definition
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    fold = {"fold": 0, "novel": [1, 2, 3, 4, 5], "base": [6, 7, 8]}
    (tmp_path / "data" / "prepared" / "fold0.json").write_text(json.dumps(fold))
    assert fold_base_classes(cfg, 0) == [6, 7, 8]
    fold["novel"] = [1, 5, 9, 13]  # another dataset's lists (COCO): not used
    (tmp_path / "data" / "prepared" / "fold0.json").write_text(json.dumps(fold))
    assert fold_base_classes(cfg, 0) == BASE_CLASSES


# --------------------------------------------------------------------------------------------- the command

@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """A PNG query (50x70), a JPEG one (64x30), a JPEG support (40x60) with its 0/255 PNG mask, an empty mask."""
    query, support, mask = episode_arrays(0)
    other = episode_arrays(1, query_shape=(64, 30))[0]
    paths = {"query": tmp_path / "in" / "street.png", "other": tmp_path / "in" / "field.jpg",
             "support": tmp_path / "in" / "support.jpg", "mask": tmp_path / "in" / "support_mask.png",
             "empty": tmp_path / "in" / "empty.png"}
    paths["query"].parent.mkdir()
    for key, array, fmt in (("query", query, "PNG"), ("other", other, "JPEG"), ("support", support, "JPEG"),
                            ("mask", mask, "PNG"), ("empty", np.zeros_like(mask), "PNG")):
        paths[key].write_bytes(encode(array, fmt))
    return paths


def predict(model: str, files: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["predict", "--params", "none", "--model", model, "--support", f"{files['support']}:{files['mask']}",
                 "--query", str(files["query"]), "--query", str(files["other"]), "--out", str(out), *extra])


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")  # MLflow's, not ours
def test_predict_from_a_checkpoint_and_from_the_registry(files: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow_cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_location=str(tmp_path / "artifacts"), registered_model="fss-predict")
    cfg = tiny_config(mlflow=mlflow_cfg)
    checkpoint = save_model(cfg, tmp_path / "best.pt", seed=0)

    assert predict(str(checkpoint), files, tmp_path / "from_checkpoint") == 0
    progress = capsys.readouterr().out
    assert "[1/2] " in progress and "street.png (70x50): foreground" in progress and "[2/2] " in progress
    out = tmp_path / "from_checkpoint"
    for stem, size in (("street", (70, 50)), ("field", (30, 64))):
        for kind, mode in (("mask", "L"), ("probability", "L"), ("overlay", "RGB")):
            with Image.open(out / f"{stem}_{kind}.png") as image:
                assert (image.mode, image.size) == (mode, size), (stem, kind)
    mask = np.asarray(Image.open(out / "street_mask.png"))
    assert set(np.unique(mask)) <= {0, 255}
    summary = json.loads((out / "predictions.json").read_text())
    assert (summary["model"], summary["method"], summary["fold"], summary["shot"]) == (str(checkpoint), "bam", 0, 1)
    assert summary["supports"] == [{"image": str(files["support"]), "mask": str(files["mask"])}]
    first = summary["queries"][0]
    assert (first["query"], first["height"], first["width"]) == (str(files["query"]), 50, 70)
    assert first["files"] == {"mask": "street_mask.png", "probability": "street_probability.png",
                              "overlay": "street_overlay.png"}
    assert first["foreground_fraction"] == pytest.approx((mask == 255).mean())

    from mlflow import MlflowClient

    from fssmeta.integrations.registry import register_model

    register_model(cfg, checkpoint=checkpoint, metrics={"miou": 0.1}, tags={}, fold=0, shot=1,
                   base_classes=BASE_CLASSES)
    MlflowClient(mlflow_cfg.tracking_uri).set_registered_model_alias("fss-predict", "champion-source", "1")
    uri = "models:/fss-predict@champion-source"
    assert predict(uri, files, tmp_path / "from_registry", "--set", f"mlflow.tracking_uri={mlflow_cfg.tracking_uri}",
                   "--quiet") == 0
    for name in ("street_mask.png", "street_probability.png", "field_mask.png"):  # same weights, same output
        assert np.array_equal(np.asarray(Image.open(out / name)),
                              np.asarray(Image.open(tmp_path / "from_registry" / name))), name
    registry_summary = json.loads((tmp_path / "from_registry" / "predictions.json").read_text())
    assert registry_summary["model"] == uri and registry_summary["queries"] == summary["queries"]
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("case", ["missing file", "support without mask", "shot mismatch", "empty mask",
                                  "override with a URI", "unknown model"])
def test_predict_errors_exit_2_naming_the_problem(case: str, files: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.chdir(tmp_path)
    checkpoint = str(save_model(tiny_config(), tmp_path / "best.pt", seed=0))
    support = f"{files['support']}:{files['mask']}"
    args = {"missing file": (checkpoint, [support], ["nowhere.png"], []),
            "support without mask": (checkpoint, [str(files["support"])], [str(files["query"])], []),
            "shot mismatch": (checkpoint, [support, support], [str(files["query"])], []),
            "empty mask": (checkpoint, [f"{files['support']}:{files['empty']}"], [str(files["query"])], []),
            "override with a URI": ("models:/fss/1", [support], [str(files["query"])], ["--shot", "5"]),
            "unknown model": (str(tmp_path / "none.pt"), [support], [str(files["query"])], [])}[case]
    model, supports, queries, extra = args
    argv = ["predict", "--params", "none", "--model", model, "--out", str(tmp_path / "out"), *extra]
    argv += [f"--support={s}" for s in supports] + [f"--query={q}" for q in queries]
    assert main(argv) == 2
    expected = {"missing file": "query image nowhere.png: file not found",
                "support without mask": f"--support {files['support']}: expected IMAGE:MASK",
                "shot mismatch": "this is a 1-shot model: it takes 1 support image(s), got 2",
                "empty mask": f"support mask {files['empty']}: the mask has no foreground pixel",
                "override with a URI": "--shot / --fold apply to a checkpoint file",
                "unknown model": "none.pt: checkpoint not found"}[case]
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
