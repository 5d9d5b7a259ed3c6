"""iFSL's N-way FS-CS task in prediction and serving (`fssmeta predict --ways N`, a served row's `ways`): N
classes, each given by `shot` supports (way-major), segmented at the query's own size as `evaluate` scores them,
with each class's presence; and the files / fields an N-way answer is written as. The 1-way core, shared by
both, is fssmeta/predict.py."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fssmeta.config import Config
from fssmeta.decoding import RequestError, png_bytes
from fssmeta.predict import at_query_size, check_sizes, check_supports, scoring_tensors


def segment_ways(model: Any, cfg: Config, shot: int, ways: int, query: np.ndarray, supports: Sequence[np.ndarray],
                 masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """iFSL's FS-CS task (docs/protocol.md section 4) at the query's own size: `ways` classes, each given by
    `shot` supports, way-major (supports[n * shot:(n + 1) * shot] are class n + 1's) -> the class
    probabilities (1 + N, H, W) float32 (channel 0 background; the softmax of the model's merged log-probs,
    resampled as evaluation scores them, so their argmax is the scored prediction) and the presence (N,)
    bool. Only for a model whose method record says `fscs` (a RequestError names the method otherwise)."""
    import torch

    from fssmeta.episode import FSCSEpisode
    from fssmeta.models import METHODS, get_method

    method = cfg.model.method
    if not get_method(method).fscs:
        fscs = ", ".join(k for k, m in METHODS.items() if m.fscs)
        raise RequestError(f"ways {ways}: this {method} model segments one class at a time; N-way (FS-CS) "
                           f"prediction needs a method that takes it ({fscs})")
    check_sizes(query, supports)
    check_way_supports(shot, ways, supports, masks)
    transform, query_img, query_mask, support_imgs, support_masks = scoring_tensors(model, cfg, query, supports,
                                                                                    masks)
    device = query_img.device
    episode = FSCSEpisode(support_imgs=support_imgs.view(1, ways, shot, *support_imgs.shape[1:]),
                          support_masks=support_masks.view(1, ways, shot, *support_masks.shape[1:]),
                          query_img=query_img, query_mask=query_mask,
                          class_ids=torch.full((1, ways), -1, device=device),  # novel: no base class
                          presence=torch.zeros(1, ways, dtype=torch.bool, device=device))  # not read
    with torch.inference_mode():
        out = model(episode)
        logits = at_query_size(transform, out.logits.float(), query.shape[:2])  # (1, 1 + N, H, W)
        probs = logits[0].softmax(0).cpu().numpy().astype(np.float32, copy=False)
        return probs, out.presence[0].cpu().numpy().astype(bool)


def check_way_supports(shot: int, ways: int, supports: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                       names: Sequence[str] | None = None) -> None:
    """`check_supports` for N ways: `ways` * `shot` supports, each way's `shot` checked as one class's."""
    if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
        raise RequestError(f"ways: expected a positive integer, got {ways!r}")
    if ways == 1:
        check_supports(shot, supports, masks, names)
        return
    if len(supports) != ways * shot:
        raise RequestError(f"ways {ways}: a {shot}-shot model takes {shot} support image(s) per class, {ways * shot} "
                           f"in all (way-major: the first {shot} are class 1's), got {len(supports)}")
    names = list(names) if names is not None else [f"support_masks[{i}]" for i in range(len(masks))]
    for n in range(ways):
        part = slice(n * shot, (n + 1) * shot)
        check_supports(shot, supports[part], masks[part], names[part])



def class_labels(probs: np.ndarray) -> np.ndarray:
    """(1 + N, H, W) class probabilities -> (H, W) uint8 labels: the argmax, 0 = background, n = class n."""
    return probs.argmax(0).astype(np.uint8)


def labels_png(labels: np.ndarray) -> bytes:
    """(H, W) uint8 labels as a palette PNG: the pixel values are the labels, shown in the VOC colours."""
    from PIL import Image

    from fssmeta.data.io import voc_palette

    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.putpalette(voc_palette())  # an 'L' image becomes 'P' with its values (the labels) unchanged
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def labels_overlay(query: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The query (H, W, 3) with each class n's pixels tinted 50% in VOC colour n and every class region's
    outline in yellow."""
    from fssmeta.data.io import voc_palette

    colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)
    out = query.astype(np.float32)
    fg = labels > 0
    out[fg] = 0.5 * out[fg] + 0.5 * colours[labels[fg]]
    padded = np.pad(labels, 1, mode="edge")
    edge = ((padded[:-2, 1:-1] != labels) | (padded[2:, 1:-1] != labels) | (padded[1:-1, :-2] != labels)
            | (padded[1:-1, 2:] != labels))
    out[fg & edge] = (255.0, 255.0, 0.0)  # a class pixel with a 4-neighbour of another label
    return out.round().astype(np.uint8)


def way_summary(probs: np.ndarray, presence: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """The labels of an N-way prediction and what every output reports of it: the query's size, the
    foreground (any class) fraction, the presence and each class's share of the pixels."""
    labels = class_labels(probs)
    ways = probs.shape[0] - 1
    return labels, {"height": int(labels.shape[0]), "width": int(labels.shape[1]), "ways": ways,
                    "foreground_fraction": float((labels > 0).mean()), "presence": [bool(p) for p in presence],
                    "class_fractions": [float((labels == n).mean()) for n in range(1, ways + 1)]}


def save_way_prediction(out: Path, stem: str, query: np.ndarray, probs: np.ndarray,
                        presence: np.ndarray) -> dict[str, Any]:
    """Write `<stem>_labels.png` (palette: value n = class n) and `<stem>_overlay.png` into `out`; returns
    `way_summary`'s fields and the file names."""
    labels, summary = way_summary(probs, presence)
    files = {"labels": f"{stem}_labels.png", "overlay": f"{stem}_overlay.png"}
    (out / files["labels"]).write_bytes(labels_png(labels))
    (out / files["overlay"]).write_bytes(png_bytes(labels_overlay(query, labels)))
    return {**summary, "files": files}
