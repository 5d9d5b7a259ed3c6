"""Segment a query from supports with a trained checkpoint: the code behind serving (the MLflow pyfunc model)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from fssmeta.config import Config

PYFUNC_INPUT = """Input: a pandas DataFrame, one episode per row, with columns
  query_img      (H, W, 3) uint8 RGB image
  support_imgs   a list of `shot` such images (sizes may differ from the query's)
  support_masks  a list of `shot` (h, w) masks of the support images: 1 = the class, 0 = not, 255 = ignore
each image or mask given as nested lists (JSON arrays) or as a base64-encoded PNG / JPEG string.
Output: one (H, W) nested list of 0/1 per row, the query's foreground at the query's own size."""


def load_checkpoint_model(checkpoint: str | Path, info: dict[str, Any]) -> tuple[Any, Config]:
    """The trained model (eval mode, CPU) and its config, rebuilt from a checkpoint and `info` (fold, shot,
    base_classes); weights load with `torch.load(weights_only=True)`."""
    from fssmeta.checkpoint import CheckpointError, load_model_state, read_checkpoint
    from fssmeta.config import config_from_dict
    from fssmeta.models import build_model

    payload = read_checkpoint(checkpoint)
    if not payload["config"]:
        raise CheckpointError(f"{checkpoint}: the checkpoint stores no config; save it with `config=...`")
    cfg = config_from_dict(payload["config"], source=f"{checkpoint} (config)")
    model = build_model(cfg.model.model_copy(update={"shot": info["shot"]}), base_classes=info["base_classes"])
    load_model_state(model, payload["model"], checkpoint)
    return model.eval(), cfg


def _decode(value: Any, what: str, rgb: bool) -> Any:
    import numpy as np
    from PIL import Image

    if isinstance(value, str):
        image = Image.open(io.BytesIO(base64.b64decode(value)))
        array = np.asarray(image.convert("RGB") if rgb else image)
    else:
        array = np.asarray(value)
    if array.ndim != (3 if rgb else 2) or (rgb and array.shape[2] != 3):
        raise ValueError(f"{what}: expected {'(H, W, 3) RGB' if rgb else '(H, W)'}, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"{what}: values must lie in 0..255")
    if not rgb and not np.isin(array, (0, 1, 255)).all():
        raise ValueError(f"{what}: mask values must be 0, 1 or 255 (ignore), got {np.unique(array)[:8].tolist()}")
    return array.astype(np.uint8)


def segment(model: Any, cfg: Config, shot: int, row: Any, where: str) -> list[list[int]]:
    """One episode (a DataFrame row, see PYFUNC_INPUT) for a `shot`-shot model -> the query's (H, W) 0/1
    foreground mask."""
    import numpy as np
    import torch

    from fssmeta.data.transforms import TestTransform
    from fssmeta.episode import Episode
    from fssmeta.losses import resize_logits

    query = _decode(row["query_img"], f"{where} query_img", rgb=True)
    supports = [_decode(v, f"{where} support_imgs[{i}]", rgb=True) for i, v in enumerate(row["support_imgs"])]
    masks = [_decode(v, f"{where} support_masks[{i}]", rgb=False) for i, v in enumerate(row["support_masks"])]
    if len(supports) != shot:
        raise ValueError(f"{where}: this is a {shot}-shot model: it takes {shot} support image(s), got {len(supports)}")
    if len(masks) != len(supports):
        raise ValueError(f"{where}: {len(supports)} support_imgs but {len(masks)} support_masks")
    for i, (image, mask) in enumerate(zip(supports, masks)):
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{where}: support_masks[{i}] is {mask.shape}, its image {image.shape[:2]}")
    size = cfg.eval.test_size if cfg.eval.resolution == "original" else cfg.eval.resized_size
    transform = TestTransform(cfg.eval.resolution, size)
    query_img, query_mask = transform(query, np.zeros(query.shape[:2], np.uint8))
    pairs = [transform(image, mask) for image, mask in zip(supports, masks)]
    device = next(model.parameters()).device
    episode = Episode(
        support_imgs=torch.stack([p[0] for p in pairs])[None].to(device),  # (1, S, 3, s, s)
        support_masks=torch.stack([p[1] for p in pairs])[None].to(device),  # (1, S, s, s)
        query_img=query_img[None].to(device),  # (1, 3, s, s)
        query_mask=query_mask[None].to(device),
        class_id=torch.tensor([-1], device=device),  # novel: matches no base class
    )
    with torch.inference_mode():
        logits = model(episode).logits.float()  # (1, 2, s, s)
    height, width = query.shape[:2]
    if cfg.eval.resolution == "original":
        # The content sits at the top-left of the square at the same scale (TestTransform.score_mask).
        side = max(height, width)
        logits = resize_logits(logits, (side, side))[..., :height, :width]
    else:
        logits = resize_logits(logits, (height, width))
    return logits.argmax(dim=1)[0].to(torch.uint8).tolist()
