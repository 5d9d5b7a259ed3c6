"""Segment a query from supports with a trained model: the one core behind serving (the MLflow pyfunc model) and
`fssmeta predict`; both decode their inputs with fssmeta/decoding.py.

Cost is bounded by the query's own size: every image is refused from its header beyond the pixel, longer-side
and aspect-ratio limits (fssmeta/decoding.py), a served request beyond its row and time limits (here), the
model runs on its fixed `eval.test_size` canvas, and its logits are resampled straight to the query's (H, W),
never through a square of the longer side."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fssmeta.config import Config
from fssmeta.decoding import (
    MASK_RULE,
    MAX_ASPECT_ENV,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    MAX_PIXELS_ENV,
    MAX_SIDE_ENV,
    RequestError,
    check_image_size,
    check_mask_options,
    decode_base64,
    env_limit,
    max_aspect_ratio,
    max_image_pixels,
    max_image_side,
    png_bytes,
)

MAX_REQUEST_ROWS = 8  # episodes per served request: each holds 1 + shot images of up to MAX_IMAGE_PIXELS
MAX_ROWS_ENV = "FSSMETA_MAX_REQUEST_ROWS"
# Seconds a served request may compute: below the scoring server's 60 s timeout (MLflow's
# MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), so a request that cannot finish is refused, not left running.
MAX_REQUEST_SECONDS = 50
MAX_SECONDS_ENV = "FSSMETA_REQUEST_SECONDS"
REQUEST_COLUMNS = ("query_img", "support_imgs", "support_masks")
MASK_OPTIONS = ("mask_threshold", "mask_class")  # optional per-row request fields, `--mask-threshold/--mask-class`
WAYS_FIELD = "ways"  # optional per-row request field, `--ways`: iFSL's N-way FS-CS task (methods whose record says fscs)
OPTIONAL_COLUMNS = (*MASK_OPTIONS, WAYS_FIELD)

PYFUNC_INPUT = f"""Input: a pandas DataFrame (over HTTP: `dataframe_records` or `dataframe_split`), one episode per row:
  query_img      a base64-encoded PNG or JPEG image (any size)
  support_imgs   a list of `shot` base64-encoded PNG or JPEG images (sizes may differ from the query's)
  support_masks  a list of `shot` base64-encoded masks, each the size of its support image
  mask_threshold optional integer, mask_class optional integer (at most one of them; absent or null = the
                 default rule): how this row's support masks are read
  ways           optional integer N (absent, null or 1: one class): iFSL's FS-CS task, for a model whose method
                 takes it (asnet): N classes, each given by `shot` supports, way-major (supports 1..shot are
                 class 1's, the next shot class 2's, ...); the query may hold any of them or none
{MASK_RULE}
Images hold at most {MAX_PIXELS_ENV} pixels (default {MAX_IMAGE_PIXELS}), a longer side of at most
{MAX_SIDE_ENV} (default {MAX_IMAGE_SIDE}) and an aspect ratio of at most {MAX_ASPECT_ENV}:1 (default
{MAX_ASPECT_RATIO}:1); a request holds at most {MAX_ROWS_ENV} rows (default {MAX_REQUEST_ROWS}). Beyond a limit
the request is refused (400) with a message naming it.
Output: one dict per row, at the query's own size as displayed (after its EXIF orientation; the output carries
no orientation tag):
  mask                    base64 PNG, mode L, 255 = foreground, 0 = background
  foreground_probability  base64 PNG, mode L, round(255 * p)
  foreground_fraction     share of the query's pixels in the mask
  height, width           the query's size
and for an N-way row (the mask and probability then cover all N classes):
  labels                  base64 PNG, palette mode, pixel value n = class n (way-major order), 0 = background
  presence                N booleans: whether each class is in the query (iFSL's presence rule)
  class_fractions         N numbers: each class's share of the query's pixels in `labels`"""


def load_checkpoint_model(checkpoint: str | Path, info: dict[str, Any]) -> tuple[Any, Config]:
    """The trained model (eval mode, CPU) and its config, rebuilt from a checkpoint and `info` (fold, shot,
    base_classes) by `runs.model_from_checkpoint`; weights load with `torch.load(weights_only=True)`."""
    from fssmeta.checkpoint import read_checkpoint
    from fssmeta.runs import model_from_checkpoint

    return model_from_checkpoint(read_checkpoint(checkpoint), shot=int(info["shot"]),
                                 base_classes=list(info["base_classes"]), source=checkpoint)


def load_training_checkpoint(checkpoint: str | Path, *, shot: int | None = None,
                             fold: int | None = None) -> tuple[Any, Config, dict[str, Any]]:
    """A checkpoint written by training, with no registry info: the model (eval mode, CPU), its config and
    the info derived from that config: shot `train.shot` and fold `train.fold` unless given, base classes
    from `runs.fold_base_classes`."""
    from fssmeta.checkpoint import read_checkpoint
    from fssmeta.runs import fold_base_classes, model_from_checkpoint, stored_config

    payload = read_checkpoint(checkpoint)
    cfg = stored_config(payload, checkpoint)
    fold = cfg.train.fold if fold is None else fold
    info = {"fold": fold, "shot": cfg.train.shot if shot is None else shot,
            "base_classes": fold_base_classes(cfg, fold), "method": cfg.model.method}
    model, cfg = model_from_checkpoint(payload, shot=info["shot"], base_classes=info["base_classes"], source=checkpoint)
    return model, cfg, info


# --------------------------------------------------------------------------------------------- decoding


def max_request_rows() -> int:
    """The limit on rows (episodes) per served request: FSSMETA_MAX_REQUEST_ROWS if set, else MAX_REQUEST_ROWS."""
    return env_limit(MAX_ROWS_ENV, MAX_REQUEST_ROWS)


def max_request_seconds() -> int:
    """The time budget of a served request: FSSMETA_REQUEST_SECONDS if set, else MAX_REQUEST_SECONDS."""
    return env_limit(MAX_SECONDS_ENV, MAX_REQUEST_SECONDS)


def check_limits() -> None:
    """ValueError naming the variable if any limit's environment variable is malformed (for a server's start)."""
    max_image_pixels(), max_image_side(), max_aspect_ratio(), max_request_rows(), max_request_seconds()


# --------------------------------------------------------------------------------------------- the core

def check_supports(shot: int, supports: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   names: Sequence[str] | None = None) -> None:
    """RequestError unless there are `shot` RGB supports with one 0/1/255 mask each, of its image's size and
    with a foreground pixel. `names` label the masks in messages (default `support_masks[i]`)."""
    if not supports:
        raise RequestError(f"no support image given: this is a {shot}-shot model, it takes {shot} support "
                           f"image(s) with their masks")
    if len(masks) != len(supports):
        raise RequestError(f"{len(supports)} support image(s) but {len(masks)} support mask(s): one mask per image")
    if len(supports) != shot:
        raise RequestError(f"this is a {shot}-shot model: it takes {shot} support image(s), got {len(supports)}")
    names = list(names) if names is not None else [f"support_masks[{i}]" for i in range(len(masks))]
    for i, (image, mask) in enumerate(zip(supports, masks)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RequestError(f"support image {i}: expected (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        if mask.dtype != np.uint8 or not np.isin(mask, (0, 1, 255)).all():
            raise RequestError(f"{names[i]}: expected uint8 labels 0, 1 and 255")
        if mask.shape != image.shape[:2]:
            raise RequestError(f"{names[i]}: the mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its support "
                               f"image is {image.shape[0]}x{image.shape[1]}: they must have the same size")
        if not (mask == 1).any():
            raise RequestError(f"{names[i]}: the mask has no foreground pixel (all background or ignore)")


def segment_arrays(model: Any, cfg: Config, shot: int, query: np.ndarray, supports: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray]) -> np.ndarray:
    """Foreground probability (H, W) float32 of `query` (H, W, 3) uint8 RGB at its own size, given `shot`
    supports (h, w, 3) uint8 and their (h, w) masks (0/1/255), resized as `cfg.eval` scores them.
    The model's device is used as it is; `foreground_mask` turns the probability into the mask. Every image
    must be within the size limits (`check_image_size`); the largest tensor is the (H, W) output."""
    import torch

    from fssmeta.episode import Episode

    check_sizes(query, supports)
    check_supports(shot, supports, masks)
    transform, query_img, query_mask, support_imgs, support_masks = scoring_tensors(model, cfg, query, supports,
                                                                                    masks)
    episode = Episode(support_imgs=support_imgs[None], support_masks=support_masks[None],  # (1, S, ...)
                      query_img=query_img, query_mask=query_mask,
                      class_id=torch.tensor([-1], device=query_img.device))  # novel: matches no base class
    with torch.inference_mode():
        logits = model(episode).logits.float()  # (1, 2, s, s)
        # softmax over two classes = sigmoid of their difference, and bilinear resampling is linear: resample
        # the one difference channel, not both.
        margin = at_query_size(transform, logits[:, 1:] - logits[:, :1], query.shape[:2])  # (1, 1, H, W)
        return margin[0, 0].sigmoid_().cpu().numpy().astype(np.float32, copy=False)  # (H, W)


def check_sizes(query: np.ndarray, supports: Sequence[np.ndarray]) -> None:
    """RequestError unless the query is (H, W, 3) uint8 and every image is within the size limits."""
    if query.dtype != np.uint8 or query.ndim != 3 or query.shape[2] != 3:
        raise RequestError(f"query image: expected (H, W, 3) uint8 RGB, got {query.dtype} {query.shape}")
    check_image_size(query.shape[1], query.shape[0], "query image")
    for i, image in enumerate(supports):
        check_image_size(image.shape[1], image.shape[0], f"support image {i}")


def scoring_tensors(model: Any, cfg: Config, query: np.ndarray, supports: Sequence[np.ndarray],
                     masks: Sequence[np.ndarray]) -> tuple[Any, ...]:
    """The scoring transform (`cfg.eval`) and the model-device tensors of checked images: transform, query
    (1, 3, s, s), its blank mask (1, s, s), supports (S, 3, s, s), support masks (S, s, s)."""
    import torch

    from fssmeta.evaluation import scoring_transform

    transform = scoring_transform(cfg)
    query_img, query_mask = transform(query, np.zeros(query.shape[:2], np.uint8))
    pairs = [transform(image, mask) for image, mask in zip(supports, masks)]
    device = next(model.parameters()).device
    return (transform, query_img[None].to(device), query_mask[None].to(device),
            torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device))


def at_query_size(transform: Any, logits: Any, size: tuple[int, int]) -> Any:
    """(1, K, s, s) canvas logits -> (1, K, H, W) at the query's size, as evaluation scores them (the content
    crop -> (H, W), or the whole square -> (H, W); on the `mean` canvas at `original` resolution without
    building the longer side's square)."""
    if transform.resolution == "original" and transform.canvas == "mean":
        return _mean_canvas_logits(logits, size)
    return transform.score_logits(logits, size)


def _mean_canvas_logits(logits: Any, size: tuple[int, int]) -> Any:
    """(1, K, h, w) -> (1, K, H, W) with the values of `TestTransform.score_logits` on the `mean` canvas (the
    whole canvas upsampled to L x L, L the longer side, then cut to (H, W)) without building the L x L square:
    a separable bilinear (align_corners=True) resampling at the same source positions."""
    import torch

    height, width = size
    side = max(height, width)
    rows = _bilinear_matrix(height, logits.shape[-2], side)  # (H, h)
    cols = _bilinear_matrix(width, logits.shape[-1], side)  # (W, w)
    return torch.einsum("hy,kyx,wx->khw", rows, logits[0].to(rows), cols)[None].to(logits.dtype)  # (1, K, H, W)


def _bilinear_matrix(count: int, source: int, side: int) -> Any:
    """(count, source) weights sampling output positions 0..count-1 of an align_corners=True resize of
    `source` samples to `side` (>= count) samples."""
    import torch

    step = (source - 1) / (side - 1) if side > 1 else 0.0
    position = torch.arange(count, dtype=torch.float64) * step
    low = position.floor().long().clamp_(0, source - 1)
    high = (low + 1).clamp_(max=source - 1)
    frac = (position - low).clamp_(0, 1)
    weights = torch.zeros(count, source, dtype=torch.float64)
    index = torch.arange(count)
    weights.index_put_((index, low), 1 - frac, accumulate=True)
    weights.index_put_((index, high), frac, accumulate=True)
    return weights.float()


def foreground_mask(prob: np.ndarray) -> np.ndarray:
    """(H, W) probability -> (H, W) uint8 0/1 mask: p >= 0.5, the argmax of the two classes."""
    return (prob >= 0.5).astype(np.uint8)


def probability_image(prob: np.ndarray) -> np.ndarray:
    """(H, W) probability -> (H, W) uint8 round(255 * p)."""
    return np.rint(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8)


def overlay(query: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The query (H, W, 3) with the foreground tinted 50% red and the mask's outline in yellow."""
    out = query.astype(np.float32)
    fg = mask.astype(bool)
    out[fg] = 0.5 * out[fg] + 0.5 * np.array([255.0, 0.0, 0.0])
    padded = np.pad(fg, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[fg & ~inner] = (255.0, 255.0, 0.0)  # a foreground pixel with a background 4-neighbour
    return out.round().astype(np.uint8)


def save_prediction(out: Path, stem: str, query: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Write `<stem>_mask.png` (0/255), `<stem>_probability.png` and `<stem>_overlay.png` into `out`; returns
    the query's size, foreground fraction and file names."""
    mask = foreground_mask(prob)
    files = {"mask": f"{stem}_mask.png", "probability": f"{stem}_probability.png", "overlay": f"{stem}_overlay.png"}
    for kind, array in (("mask", mask * 255), ("probability", probability_image(prob)),
                        ("overlay", overlay(query, mask))):
        (out / files[kind]).write_bytes(png_bytes(array))
    return {"height": int(mask.shape[0]), "width": int(mask.shape[1]), "foreground_fraction": float(mask.mean()),
            "files": files}


def _image_list(value: Any, what: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise RequestError(f"{what}: expected a list of base64-encoded PNG or JPEG images, got a "
                           f"{type(value).__name__}")
    return list(value)


def _optional_int(record: Mapping[str, Any], key: str, where: str) -> int | None:
    """An optional integer field: absent, None or NaN (a column other rows fill) -> None."""
    value = record.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():  # a column with NaN holds floats
        return int(value)
    raise RequestError(f"{where} {key}: expected an integer, got {value!r}")


def check_request_rows(count: int) -> None:
    """RequestError naming the limit if a served request holds more than `max_request_rows()` rows."""
    if count > (limit := max_request_rows()):
        raise RequestError(f"model input: {count} rows, at most {limit} per request allowed ({MAX_ROWS_ENV}): split "
                           f"the request")


def segment_records(model: Any, cfg: Config, shot: int, records: Sequence[Mapping[str, Any]], *,
                    clock: Callable[[], float] = time.monotonic) -> list[dict[str, Any]]:
    """A served request's rows -> their output dicts, after the row limit (`check_request_rows`).

    Within the time budget (`max_request_seconds`): before each row after the first, a request whose next row
    would end past the budget at the rows' mean pace is refused (a RequestError saying how many rows fit),
    so the server stops working on it before the client's timeout instead of computing an answer nobody
    receives."""
    check_request_rows(len(records))
    budget, start = max_request_seconds(), clock()
    outputs = []
    for i, record in enumerate(records):
        if i:
            elapsed = clock() - start
            if elapsed + elapsed / i > budget:
                raise RequestError(f"model input: {len(records)} rows would take about {elapsed / i * len(records):.0f} "
                                   f"s at {elapsed / i:.1f} s per row, more than the {budget} s a request may take "
                                   f"({MAX_SECONDS_ENV}); stopped after {i} rows: send at most {i} rows per request")
        outputs.append(segment_record(model, cfg, shot, record, f"row {i}"))
    return outputs


def segment_record(model: Any, cfg: Config, shot: int, record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One request row (see PYFUNC_INPUT) -> its output dict; `where` ("row 0") prefixes every error."""
    missing = [c for c in REQUEST_COLUMNS if c not in record]
    if missing:
        raise RequestError(f"{where}: missing field(s) {', '.join(missing)}")
    options = {key: _optional_int(record, key, where) for key in MASK_OPTIONS}  # decode_base64's keywords
    ways = _optional_int(record, WAYS_FIELD, where)
    ways = 1 if ways is None else ways
    try:
        check_mask_options(options["mask_threshold"], options["mask_class"])
    except RequestError as exc:
        raise RequestError(f"{where}: {exc}") from None
    from fssmeta.predict_ways import check_way_supports, labels_png, segment_ways, way_summary

    query = decode_base64(record["query_img"], f"{where} query_img")
    images = _image_list(record["support_imgs"], f"{where} support_imgs")
    labels = _image_list(record["support_masks"], f"{where} support_masks")
    supports = [decode_base64(v, f"{where} support_imgs[{i}]") for i, v in enumerate(images)]
    masks = [decode_base64(v, f"{where} support_masks[{i}]", mask=True, **options) for i, v in enumerate(labels)]
    try:
        check_way_supports(shot, ways, supports, masks, [f"support_masks[{i}]" for i in range(len(masks))])
        if ways > 1:
            probs, presence = segment_ways(model, cfg, shot, ways, query, supports, masks)
    except RequestError as exc:
        raise RequestError(f"{where}: {exc}") from None
    if ways > 1:
        labels, summary = way_summary(probs, presence)
        return {"mask": base64.b64encode(png_bytes((labels > 0).astype(np.uint8) * 255)).decode("ascii"),
                "foreground_probability": base64.b64encode(png_bytes(probability_image(1.0 - probs[0]))).decode("ascii"),
                "labels": base64.b64encode(labels_png(labels)).decode("ascii"),
                **{k: v for k, v in summary.items() if k != "ways"}}
    prob = segment_arrays(model, cfg, shot, query, supports, masks)
    mask = foreground_mask(prob)
    return {"mask": base64.b64encode(png_bytes(mask * 255)).decode("ascii"),
            "foreground_probability": base64.b64encode(png_bytes(probability_image(prob))).decode("ascii"),
            "foreground_fraction": float(mask.mean()), "height": int(mask.shape[0]), "width": int(mask.shape[1])}
