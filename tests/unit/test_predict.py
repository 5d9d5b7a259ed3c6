"""`fssmeta predict` and the decoding rules it shares with serving: the mask value rule and its options, 16-bit and
EXIF-oriented images, the size and row limits, logits resampled at the query's size, support validation, and the
command on a training checkpoint and on a registered model (same outputs)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fssmeta.cli import main
from fssmeta.config import EvalConfig
from fssmeta.data.io import voc_palette
from fssmeta.decoding import (
    MAX_IMAGE_PIXELS,
    RequestError,
    decode_base64,
    decode_image,
    max_image_pixels,
    read_image_file,
)
from fssmeta.models import build_model
from fssmeta.predict import check_supports, overlay, segment_arrays
from fssmeta.runs import fold_base_classes
from fssmeta.served import check_limits, segment_record, segment_records
from tests.mlflow_helpers import (
    BASE_CLASSES,
    encode,
    episode_arrays,
    local_mlflow,
    png_base64,
    save_model,
    tiny_config,
)


def image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- decoding

def test_mask_value_rule():
    black_white = np.array([[0, 255], [255, 0]], np.uint8)
    assert decode_image(encode(black_white), "m", mask=True).tolist() == [[0, 1], [1, 0]]  # 255 alone: foreground
    pascal = np.array([[0, 7, 255], [0, 7, 255]], np.uint8)  # 255 beside one class value: the ignore outline
    assert decode_image(encode(pascal), "m", mask=True).tolist() == [[0, 1, 255], [0, 1, 255]]
    two_classes = np.array([[0, 1, 255], [0, 7, 255]], np.uint8)  # ambiguous: which class is the support's?
    with pytest.raises(RequestError, match=r"^m: ambiguous mask: it holds 2 values besides 0 and 255 \(1, 7\)"):
        decode_image(encode(two_classes), "m", mask=True)
    assert decode_image(encode(two_classes), "m", mask=True, mask_class=7).tolist() == [[0, 0, 255], [0, 1, 255]]
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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16bit(array: np.ndarray) -> bytes:
    """A 16-bit grayscale (H, W) or RGB (H, W, 3) PNG, written by hand: Pillow writes no 16-bit RGB."""
    values = np.asarray(array, dtype=">u2")
    colour_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + row.tobytes() for row in values)
    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + \
        png_chunk(b"IEND", b"")


def test_16_bit_images_are_scaled_by_their_bit_depth_not_clipped(tmp_path: Path):
    gray = np.array([[0, 1000, 32896], [40000, 65280, 65535]], np.uint16)  # Pillow clips all but 0 to 255
    path = tmp_path / "gray16.png"
    path.write_bytes(image_bytes(Image.fromarray(gray)))
    with Image.open(path) as image:
        assert image.mode.startswith("I")
    decoded = read_image_file(path, "query image")
    assert decoded.shape == (2, 3, 3) and (decoded == decoded[..., :1]).all()
    assert decoded[..., 0].tolist() == [[0, 4, 128], [156, 254, 255]]  # round(v * 255 / 65535)
    assert decode_image(png_16bit(gray), "q")[..., 0].tolist() == [[0, 4, 128], [156, 254, 255]]
    rgb = np.array([[[0, 1000, 65535], [30000, 40000, 512]]], np.uint16)
    assert decode_image(png_16bit(rgb), "q").tolist() == [[[0, 3, 255], [117, 156, 2]]]  # the high byte
    binary = np.array([[0, 65535], [65535, 0]], np.uint16)  # a 16-bit mask holds labels: read as they are
    assert decode_image(png_16bit(binary), "m", mask=True).tolist() == [[0, 1], [1, 0]]


def exif_bytes(image: Image.Image, orientation: int, format: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation; 6 = shown turned 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format=format, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_turns_images_and_masks_as_viewers_show_them(tmp_path: Path):
    stored = np.zeros((32, 64, 3), np.uint8)  # stored 64 wide, 32 high; bright top-left block
    stored[:16, :16] = 255
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_bytes(Image.fromarray(stored), 6, "JPEG"))
    image = read_image_file(path, "query image")
    assert image.shape == (64, 32, 3)  # shown 32 wide, 64 high
    assert image[:16, 16:].mean() > 240 and image[16:, :].mean() < 15  # the block is now top-right
    mask = np.zeros((32, 64), np.uint8)
    mask[:16, :16] = 255
    labels = decode_image(exif_bytes(Image.fromarray(mask), 6, "PNG"), "m", mask=True)
    assert np.array_equal(labels, np.rot90(mask, k=-1) // 255)


def anti_aliased_mask(shape: tuple[int, int] = (40, 60)) -> np.ndarray:
    """A 0/255 disc drawn at 4x and shrunk: its edge holds many grey values."""
    big = Image.new("L", (shape[1] * 4, shape[0] * 4))
    ImageDraw.Draw(big).ellipse((40, 20, shape[1] * 4 - 40, shape[0] * 4 - 20), fill=255)
    return np.asarray(big.resize((shape[1], shape[0]), Image.Resampling.LANCZOS))


def test_anti_aliased_masks_need_a_threshold(tmp_path: Path):
    soft = anti_aliased_mask()
    assert len(np.unique(soft)) > 10
    path = tmp_path / "soft.png"
    path.write_bytes(encode(soft))
    with pytest.raises(RequestError, match=rf"support mask {path}: ambiguous mask: it holds \d+ values besides 0 "
                                           r"and 255 \(1, 2, .*--mask-threshold T"):
        read_image_file(path, "support mask", mask=True)
    labels = read_image_file(path, "support mask", mask=True, mask_threshold=128)
    assert np.array_equal(labels, (soft >= 128).astype(np.uint8))  # the interior is foreground, not ignore
    assert labels[20, 30] == 1 and labels[0, 0] == 0
    jpeg = decode_image(encode(soft, "JPEG"), "m", mask=True, mask_threshold=200)
    assert set(np.unique(jpeg)) == {0, 1} and jpeg.sum() < labels.sum()


def test_label_maps_need_a_class(tmp_path: Path):
    label_map = np.zeros((20, 30), np.uint8)
    label_map[2:8, 2:8], label_map[10:18, 10:28] = 3, 7
    label_map[8, 2:8] = 255  # the PASCAL outline
    path = tmp_path / "labels.png"
    path.write_bytes(encode(label_map))
    with pytest.raises(RequestError, match=r"ambiguous mask: it holds 2 values besides 0 and 255 \(3, 7\): for a "
                                           r"label map pick one class with --mask-class ID"):
        read_image_file(path, "support mask", mask=True)
    labels = read_image_file(path, "support mask", mask=True, mask_class=7)
    assert np.array_equal(labels, np.where(label_map == 255, 255, label_map == 7).astype(np.uint8))
    with pytest.raises(RequestError, match=r"mask class 9 is not in the mask \(values found: 0, 3, 7, 255\)"):
        read_image_file(path, "support mask", mask=True, mask_class=9)
    with pytest.raises(RequestError, match="mask threshold and mask class both given"):
        read_image_file(path, "support mask", mask=True, mask_class=7, mask_threshold=128)
    with pytest.raises(RequestError, match="a JPEG mask is lossy: a mask class needs a PNG"):
        decode_image(encode(label_map, "JPEG"), "m", mask=True, mask_class=7)
    with pytest.raises(RequestError, match="mask threshold 0: expected an integer from 1 to 65535"):
        read_image_file(path, "support mask", mask=True, mask_threshold=0)


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
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        png_chunk(b"IDAT", b"")


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


def test_long_and_thin_images_are_refused_naming_the_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name in ("FSSMETA_MAX_IMAGE_PIXELS", "FSSMETA_MAX_IMAGE_SIDE", "FSSMETA_MAX_ASPECT_RATIO"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RequestError, match=r"^q: image too long: 65536x256, its longer side 65536 pixels, at most "
                                           r"8192 allowed \(FSSMETA_MAX_IMAGE_SIDE\)"):
        decode_image(png_header_only(65536, 256), "q")  # 16.7 M pixels: within the pixel limit
    with pytest.raises(RequestError, match=r"^q: image too thin: 50x4000, an aspect ratio of 80.0:1, at most 64:1 "
                                           r"allowed \(FSSMETA_MAX_ASPECT_RATIO\)"):
        decode_image(png_header_only(50, 4000), "q")
    thin = tmp_path / "thin.png"
    thin.write_bytes(encode(np.zeros((5, 30), np.uint8)))
    assert read_image_file(thin, "query image").shape == (5, 30, 3)
    monkeypatch.setenv("FSSMETA_MAX_ASPECT_RATIO", "4")  # read at call time
    with pytest.raises(RequestError, match=rf"query image {thin}: image too thin: 30x5, an aspect ratio of 6.0:1"):
        read_image_file(thin, "query image")
    with pytest.raises(RequestError, match="^query image: image too thin"):  # arrays are checked too
        segment_arrays(None, tiny_config(), 1, np.zeros((5, 30, 3), np.uint8), [], [])
    row = {"query_img": png_base64(np.zeros((5, 30), np.uint8)), "support_imgs": [], "support_masks": []}
    with pytest.raises(RequestError, match="^row 0 query_img: image too thin"):
        segment_record(None, tiny_config(), 1, row, "row 0")
    monkeypatch.setenv("FSSMETA_MAX_IMAGE_SIDE", "0")
    with pytest.raises(ValueError, match="FSSMETA_MAX_IMAGE_SIDE: expected a positive integer, got '0'"):
        read_image_file(thin, "query image")


def test_a_request_holds_at_most_the_row_limit(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FSSMETA_MAX_REQUEST_ROWS", raising=False)
    with pytest.raises(RequestError, match=r"model input: 9 rows, at most 8 per request allowed "
                                           r"\(FSSMETA_MAX_REQUEST_ROWS\): split the request"):
        segment_records(None, tiny_config(), 1, [{}] * 9)  # refused before any row is decoded
    monkeypatch.setenv("FSSMETA_MAX_REQUEST_ROWS", "2")
    with pytest.raises(RequestError, match="3 rows, at most 2 per request"):
        segment_records(None, tiny_config(), 1, [{}] * 3)
    with pytest.raises(RequestError, match="row 0: missing field"):  # within the limit: the rows are read
        segment_records(None, tiny_config(), 1, [{}] * 2)


def tiny_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, shot=1, base_classes=BASE_CLASSES).eval()


def test_a_request_that_cannot_finish_in_time_is_refused(monkeypatch: pytest.MonkeyPatch):
    """At the rows' mean pace, a request whose next row would end past FSSMETA_REQUEST_SECONDS is stopped and
    refused (the client would get a timeout anyway), saying how many rows fit."""
    cfg = tiny_config()
    model = tiny_model(cfg)
    query, support, mask = episode_arrays(0)
    row = {"query_img": png_base64(query), "support_imgs": [png_base64(support)], "support_masks": [png_base64(mask)]}
    ticks = iter(range(0, 100, 10))  # each clock reading 10 s later: 10 s per row
    monkeypatch.setenv("FSSMETA_REQUEST_SECONDS", "25")
    assert len(segment_records(model, cfg, 1, [row] * 2, clock=lambda: next(ticks))) == 2  # 10 + 10 <= 25
    ticks = iter(range(0, 100, 10))
    with pytest.raises(RequestError, match=r"3 rows would take about 30 s at 10.0 s per row, more than the 25 s a "
                                           r"request may take \(FSSMETA_REQUEST_SECONDS\); stopped after 2 rows"):
        segment_records(model, cfg, 1, [row] * 3, clock=lambda: next(ticks))
    monkeypatch.setenv("FSSMETA_REQUEST_SECONDS", "soon")
    with pytest.raises(ValueError, match="FSSMETA_REQUEST_SECONDS: expected a positive integer"):
        check_limits()


def test_served_rows_take_the_mask_options():
    cfg = tiny_config()
    model = tiny_model(cfg)
    query, support, _ = episode_arrays(0)
    row = {"query_img": png_base64(query), "support_imgs": [png_base64(support)],
           "support_masks": [png_base64(anti_aliased_mask())]}
    with pytest.raises(RequestError, match=r"^row 0 support_masks\[0\]: ambiguous mask"):
        segment_record(model, cfg, 1, row, "row 0")
    with pytest.raises(RequestError, match=r"^row 0 support_masks\[0\]: ambiguous mask"):
        segment_record(model, cfg, 1, {**row, "mask_threshold": float("nan")}, "row 0")  # NaN: not given
    out = segment_record(model, cfg, 1, {**row, "mask_threshold": 128.0}, "row 0")  # a column with NaN: floats
    assert (out["height"], out["width"]) == (50, 70)
    with pytest.raises(RequestError, match="^row 2 mask_threshold: expected an integer, got 'high'"):
        segment_record(model, cfg, 1, {**row, "mask_threshold": "high"}, "row 2")
    with pytest.raises(RequestError, match="^row 0: mask threshold and mask class both given"):
        segment_record(model, cfg, 1, {**row, "mask_threshold": 128, "mask_class": 1}, "row 0")


@pytest.mark.parametrize("eval_cfg", [EvalConfig(test_size=65), EvalConfig(test_size=65, canvas="mean"),
                                      EvalConfig(resolution="resized", resized_size=65)],
                         ids=["bam canvas", "mean canvas", "resized"])
def test_logits_are_resampled_at_the_query_size_not_a_square(eval_cfg: EvalConfig, monkeypatch: pytest.MonkeyPatch):
    from torch.profiler import ProfilerActivity, profile

    cfg = tiny_config(eval=eval_cfg)
    model = tiny_model(cfg)
    query = np.zeros((4096, 64, 3), np.uint8)  # 4096x4096 logits would be 64 MiB per channel
    support = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[5:20, 5:20] = 1
    sizes = []
    interpolate = torch.nn.functional.interpolate

    def spy(input, size=None, *args, **kwargs):
        out = interpolate(input, size, *args, **kwargs)
        sizes.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        prob = segment_arrays(model, cfg, 1, query, [support], [mask])
    assert prob.shape == (4096, 64) and prob.dtype == np.float32
    assert all(h * w <= 4096 * 64 for h, w in sizes), sizes
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest < 8 * 2**20, largest  # one (4096, 64) float32 channel is 1 MiB


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
    mlflow_cfg = local_mlflow(tmp_path, monkeypatch, "fss-predict")
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


def test_predict_reads_masks_by_the_options_and_answers_in_the_shown_orientation(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch,
                                                                                capsys: pytest.CaptureFixture[str]):
    monkeypatch.chdir(tmp_path)
    checkpoint = str(save_model(tiny_config(), tmp_path / "best.pt", seed=0))
    query, support, _ = episode_arrays(0, query_shape=(30, 64))
    paths = {"query": tmp_path / "turned.jpg", "support": tmp_path / "support.png", "mask": tmp_path / "soft.png"}
    paths["query"].write_bytes(exif_bytes(Image.fromarray(query), 6, "JPEG"))  # stored 64x30, shown 30x64
    paths["support"].write_bytes(encode(support))
    paths["mask"].write_bytes(encode(anti_aliased_mask()))
    argv = ["predict", "--params", "none", "--model", checkpoint, "--support", f"{paths['support']}:{paths['mask']}",
            "--query", str(paths["query"]), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    assert f"support mask {paths['mask']}: ambiguous mask" in capsys.readouterr().err
    assert main([*argv, "--mask-threshold", "128"]) == 0
    with Image.open(tmp_path / "out" / "turned_mask.png") as mask:
        assert mask.size == (30, 64) and not mask.getexif()  # as the query is shown, with no orientation tag
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert (summary["queries"][0]["height"], summary["queries"][0]["width"]) == (64, 30)
