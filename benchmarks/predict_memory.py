"""Peak memory of one served prediction (`segment_record`: base64 PNG in, decoding, the model on its canvas, the
(H, W) probability, mask and probability PNGs out) for extreme query shapes, with a tiny randomly initialised
BAM at the default `eval.test_size` (473) and one 473x473 support.

Run: `.venv/bin/python benchmarks/predict_memory.py [--shapes 4096x4096,16384x1024] [--threads 2]`.
Each shape runs in its own subprocess after a warm-up prediction on a small query; it reports the resident-set
peak above the resident set just before the request (the peak is reset through /proc/self/clear_refs, so it is
this request's alone; it counts the torch CPU allocator too), the tracemalloc peak (numpy's and Python's
allocations only) and the time. A shape beyond the limits (`fssmeta.decoding.check_image_size`) shows the refusal.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc

import numpy as np

SHAPES = ("473x473", "4096x64", "8192x128", "4096x4096", "8192x2048", "16384x1024", "65536x256")  # HxW
MIB = 2**20


def png_base64(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def query_image(height: int, width: int) -> np.ndarray:
    """A smooth (H, W, 3) uint8 pattern: cheap to build and to encode at any size."""
    rows = (np.arange(height, dtype=np.uint32) * 255 // max(1, height - 1)).astype(np.uint8)
    cols = (np.arange(width, dtype=np.uint32) * 255 // max(1, width - 1)).astype(np.uint8)
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = rows[:, None], cols[None, :], 128
    return image


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_case(shape: str) -> dict[str, object]:
    """One prediction of an HxW query in this process (built for it)."""
    import torch

    from fssmeta.config import Config, ModelConfig
    from fssmeta.decoding import RequestError
    from fssmeta.models import build_model
    from fssmeta.served import segment_record

    height, width = (int(side) for side in shape.split("x"))
    cfg = Config(model=ModelConfig(backbone="small", pspnet={"ppm_dim": 16},
                                   bam={"reduce_dim": 16, "aspp_dilations": (1, 2, 3)}))
    torch.manual_seed(0)
    model = build_model(cfg.model, shot=1, base_classes=list(range(6, 21))).eval()
    support = query_image(473, 473)
    mask = np.zeros((473, 473), np.uint8)
    mask[100:300, 150:350] = 255
    row = {"support_imgs": [png_base64(support)], "support_masks": [png_base64(mask)]}
    segment_record(model, cfg, 1, {**row, "query_img": png_base64(query_image(300, 400))}, "warm-up")
    record = {**row, "query_img": png_base64(query_image(height, width))}
    request_mib = len(record["query_img"]) / MIB

    base_kib = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    tracemalloc.start()
    start = time.perf_counter()
    try:
        segment_record(model, cfg, 1, record, "row 0")
        outcome = "ok"
    except RequestError as exc:
        outcome = "refused: " + str(exc).partition(": ")[2]
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak_kib = status_kib("VmHWM")
    return {"shape": shape, "pixels": height * width, "request_mib": request_mib, "outcome": outcome,
            "rss_delta_mib": (peak_kib - base_kib) / 1024, "tracemalloc_mib": traced_peak / MIB,
            "seconds": seconds}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="HxW query shapes, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one shape, print its JSON
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_case(args.case)))
        return

    print(f"machine: {machine()}; torch threads {args.threads}")
    print(f"{'query HxW':>11} {'pixels':>10} {'request':>9} {'RSS peak':>9} {'traced':>8} {'time':>7}  outcome")
    for shape in args.shapes.split(","):
        done = subprocess.run([sys.executable, __file__, "--case", shape, "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{r['shape']:>11} {r['pixels']:>10} {r['request_mib']:>6.1f} MiB {r['rss_delta_mib']:>5.0f} MiB "
              f"{r['tracemalloc_mib']:>4.0f} MiB {r['seconds']:>5.2f} s  {r['outcome']}")


if __name__ == "__main__":
    main()
