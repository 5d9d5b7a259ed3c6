"""Served requests: the rows of the MLflow pyfunc model's input (PYFUNC_INPUT) -> one output dict each, under
the request's row and time limits. A 1-way row goes through `predict.segment_arrays`, an N-way row (`ways`)
through `predict_ways.segment_ways`; both decode their images with fssmeta/decoding.py, as `fssmeta predict` does."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
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
    check_mask_options,
    decode_base64,
    env_limit,
    max_aspect_ratio,
    max_image_pixels,
    max_image_side,
    png_bytes,
)
from fssmeta.predict import foreground_mask, probability_image, segment_arrays
from fssmeta.predict_ways import check_way_supports, labels_png, segment_ways, way_summary

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

def max_request_rows() -> int:
    """The limit on rows (episodes) per served request: FSSMETA_MAX_REQUEST_ROWS if set, else MAX_REQUEST_ROWS."""
    return env_limit(MAX_ROWS_ENV, MAX_REQUEST_ROWS)


def max_request_seconds() -> int:
    """The time budget of a served request: FSSMETA_REQUEST_SECONDS if set, else MAX_REQUEST_SECONDS."""
    return env_limit(MAX_SECONDS_ENV, MAX_REQUEST_SECONDS)


def check_limits() -> None:
    """ValueError naming the variable if any limit's environment variable is malformed (for a server's start)."""
    max_image_pixels(), max_image_side(), max_aspect_ratio(), max_request_rows(), max_request_seconds()


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
