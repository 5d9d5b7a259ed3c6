"""fssmeta vs the official code, side by side: the same weights and inputs, timed interleaved in one process.

    .venv/bin/python benchmarks/compare_official.py --official bam=/tmp/official/BAM \\
        --official pfenet=/tmp/official/PFENet [--size 473] [--repeats 3] [--rows eval1 eval5 train backbone]
    .venv/bin/python benchmarks/compare_official.py --official hsnet=/tmp/official/hsnet --torchvision /tmp/tvpkg \\
        --size 400 --train-batch 4 --variants fp32 --memory

HSNet (issue 16) is timed as its own train.py / test.py run it: training one 1-shot forward, CE, Adam step
(`train_mode`: backbone BN fixed); evaluation `predict_mask_nshot`, one full forward per shot (the query
re-encoded each time) and the vote. fssmeta's eval row is its forward (the query encoded once, the same vote).

`--official METHOD=PATH` is a local checkout of the commit tools/oracle.py pins (docs/parity.md says how to
get one: `git clone` the repository and `git checkout` the commit). Nothing is fetched at run time. The
official model is built as in tools/oracle.py: its code imported from the checkout and run in a scratch
directory, fssmeta's seeded ResNet-50 weights copied into its layout (strict load), so both compute the same
function (equal to ~1e-6, tests/unit/test_oracle_parity.py). Each row times both implementations on the
same batch, alternating official / fssmeta `--repeats` times after one warm-up each, and prints the median
milliseconds per call and the ratio official / fssmeta (> 1: fssmeta is faster). fssmeta variants: `fp32`
(the protocol), `bf16` (autocast, `eval.amp` / `train.amp: all`; on CPU only where it computes bf16
natively), `bf16-cl` (bf16 + channels_last). `--memory` runs each side of each row again in a child process
of its own (a warm-up, then `--repeats` calls) and adds its peak memory (CPU: max RSS; CUDA: max allocated)
and `alone`, the ratio of the two children's median ms: each side's speed with no other model's allocations
in the process (interleaved, one side's freed buffers can make the other's large allocations cheaper). On CUDA the official code runs as
published (its `.cuda()` calls); on CPU they are made no-ops.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fssmeta.episode import Episode
from fssmeta.models import get_method
from fssmeta.models.ops import scaled_bins
from fssmeta.train import autocast, build_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
# The official `model/` folders are namespace packages, which lose to any `model.py` on the path: this
# script's own folder holds benchmarks/model.py.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from tools import oracle  # noqa: E402  (the official model's construction, shared with the parity fixtures)

ROWS = ("eval1", "eval5", "train", "backbone")
VARIANTS = ("fp32", "bf16", "bf16-cl")




def row_shape(row: str, train_batch: int) -> tuple[int, int]:
    """(shot, batch) of a row: eval rows at batch 1 (the official test loaders'), training at `train_batch`."""
    return {"eval1": (1, 1), "eval5": (5, 1), "train": (1, train_batch), "backbone": (1, train_batch)}[row]


def batch_inputs(size: int, shot: int, batch: int) -> dict[str, torch.Tensor]:
    """`batch` of oracle.make_inputs' synthetic episodes, stacked (uint8 images, 0/1/255 masks)."""
    parts = [oracle.make_inputs(100 + b, size, shot) for b in range(batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def fssmeta_episode(inputs: dict[str, torch.Tensor], class_id: int, device: torch.device) -> Episode:
    ep = oracle.episode(inputs, class_id)
    B = ep.query_img.shape[0]
    return Episode(ep.support_imgs.to(device), ep.support_masks.to(device), ep.query_img.to(device),
                   ep.query_mask.to(device), torch.full((B,), class_id, dtype=torch.long, device=device))


class Pair:
    """One method's fssmeta model and official model on the same weights, with the calls the rows time."""

    def __init__(self, method: str, official_path: Path, module, scratch: Path, shot: int, size: int,
                 device: torch.device) -> None:
        self.method, self.device = method, device
        feature = (size - 1) // 8 + 1
        options = get_method(method).options_of(oracle.ModelConfig(**oracle.MODEL_CONFIG[method]))
        bins = tuple(b for b, _ in scaled_bins(options.pyramid_bins, (feature, feature))) if method == "pfenet" else ()
        self.shot = shot
        case = oracle.Case(f"{shot}-shot", shot, size, bins, losses=False)
        self.ours = oracle.fssmeta_model(oracle.MODEL_CONFIG[method], shot).to(device)
        self.official = oracle.official_model(method, module, official_path, case, self.ours.state_dict(),
                                              scratch).to(device)
        # Frozen as the official train.py leaves it: layer0-4 (PFENet's train.py, BAM's freeze_modules) and
        # BAM's base learner, whose forward is outside no_grad and would otherwise be back-propagated.
        for name in ("layer0", "layer1", "layer2", "layer3", "layer4", "learner_base", "backbone"):
            for p in getattr(self.official, name, nn.Module()).parameters():
                p.requires_grad_(False)
        # The method's optimiser at a negligible rate: the rows repeat one batch, which the recipe's rate
        # would drive to NaN on these random weights; the step's cost does not depend on the rate.
        recipe = get_method(method).recipe.model_copy(update={"lr": 1e-9})
        self.ours_opt = build_optimizer([p for p in self.ours.parameters() if p.requires_grad], recipe)
        self.official_opt = build_optimizer([p for p in self.official.parameters() if p.requires_grad], recipe)

    def official_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.method == "hsnet":  # its loader's masks: the class 1, every other pixel 0 (oracle.hsnet_inputs)
            inputs = {**oracle.hsnet_inputs(inputs), "support_masks": (inputs["support_masks"] == 1).to(torch.uint8)}
        return (oracle.normalise(inputs["query_img"]).to(self.device),
                oracle.normalise(inputs["support_imgs"]).to(self.device),
                inputs["support_masks"].float().to(self.device), inputs["query_mask"].float().to(self.device))

    @torch.no_grad()
    def official_eval(self, x, s_x, s_y, y) -> None:
        self.official.eval()
        if self.method == "hsnet":  # test.py: predict_mask_nshot, one forward per shot
            self.official.predict_mask_nshot({"query_img": x, "support_imgs": s_x, "support_masks": s_y}, self.shot)
        elif self.method == "pfenet":
            self.official(x, s_x, s_y)
        else:
            self.official(x, s_x, s_y, None, None, cat_idx=None)

    def official_train(self, x, s_x, s_y, y) -> None:
        """One step as the official train.py: BAM with every BN fixed (`fix_bn`), main + aux losses."""
        self.official.train()
        if self.method == "hsnet":  # train.py: train_mode (backbone BN fixed), 1 shot, compute_objective = CE
            self.official.train_mode()
            loss = self.official.compute_objective(self.official(x, s_x[:, 0], s_y[:, 0]), y)
        elif self.method == "bam":
            for m in self.official.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            cat_idx = [torch.full((x.shape[0],), oracle.BASE_CLASSES.index(oracle.TRAIN_CLASS), device=self.device)]
            _, main, aux1, aux2 = self.official(x, s_x, s_y, y, y, cat_idx=cat_idx)
            loss = main + aux1 + aux2
        else:
            _, main, aux = self.official(x, s_x, s_y, y)
            loss = main + aux
        self.official_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.official_opt.step()

    @torch.no_grad()
    def official_backbone(self, x, s_x, s_y, y) -> None:
        o = self.official
        o.eval()
        if self.method == "hsnet":
            o.extract_feats(x, o.backbone, o.feat_ids, o.bottleneck_ids, o.lids)
        else:
            o.layer4(o.layer3(o.layer2(o.layer1(o.layer0(x)))))

    def ours_eval(self, ep: Episode, amp: str) -> None:
        self.ours.eval()
        with torch.no_grad(), autocast(self.device, amp):
            self.ours(ep)

    def ours_train(self, ep: Episode, amp: str) -> None:
        self.ours.train()
        train_step(self.ours, ep, get_method(self.method).loss, self.ours_opt, amp=amp)
        self.ours.eval()

    def ours_backbone(self, ep: Episode, amp: str) -> None:
        self.ours.eval()
        with torch.no_grad(), autocast(self.device, amp):
            if self.method == "hsnet":
                self.ours.backbone.bottleneck_features(ep.query_img)
            else:
                self.ours.backbone(ep.query_img)

    def channels_last(self, on: bool) -> None:
        self.ours.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - start)


def official_context(device: torch.device):
    return oracle.cpu_only() if device.type == "cpu" else contextlib.nullcontext()


def run_row(pair: Pair, row: str, variant: str, inputs: dict[str, torch.Tensor], repeats: int,
            ours_inputs: dict[str, torch.Tensor] | None = None) -> dict:
    """Median ms of official and fssmeta on `row`, interleaved, and the ratio of their ms per episode
    (official / fssmeta). `ours_inputs` (default `inputs`): fssmeta's own batch, e.g. a larger one."""
    device = pair.device
    args = pair.official_inputs(inputs)
    ours_inputs = inputs if ours_inputs is None else ours_inputs
    class_id = oracle.TRAIN_CLASS if row == "train" else 1
    ep = fssmeta_episode(ours_inputs, class_id, device)
    amp = "off" if variant == "fp32" else "all"
    pair.channels_last(variant == "bf16-cl")
    if variant == "bf16-cl":
        ep = Episode(ep.support_imgs.contiguous(memory_format=torch.channels_last) if ep.support_imgs.dim() == 4
                     else ep.support_imgs, ep.support_masks,
                     ep.query_img.contiguous(memory_format=torch.channels_last), ep.query_mask, ep.class_id)
    kind = "backbone" if row == "backbone" else ("train" if row == "train" else "eval")
    official = getattr(pair, f"official_{kind}")
    ours = getattr(pair, f"ours_{kind}")
    with official_context(device):
        official(*args)
        ours(ep, amp)
        times = {"official": [], "fssmeta": []}
        for _ in range(repeats):
            times["official"].append(timed(lambda: official(*args), device))
            times["fssmeta"].append(timed(lambda: ours(ep, amp), device))
    pair.channels_last(False)
    medians = {k: statistics.median(v) for k, v in times.items()}
    per_episode = (medians["official"] / inputs["query_img"].shape[0], medians["fssmeta"] / ep.query_img.shape[0])
    return {**medians, "ratio": per_episode[0] / per_episode[1]}


def alone(spec: str, args: argparse.Namespace, checkouts: dict[str, Path]) -> dict[str, float]:
    """One side of one row in a child process of its own: its peak MiB and the median ms of `--repeats` calls
    after one warm-up, with no other model's allocations in the process."""
    cmd = [sys.executable, __file__, "--child", spec, "--size", str(args.size), "--train-batch", str(args.train_batch),
           "--repeats", str(args.repeats),
           *sum((["--official", f"{m}={p}"] for m, p in checkouts.items()), []),
           *(["--torchvision", str(args.torchvision.resolve())] if args.torchvision else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{spec}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", action="append", required=True, metavar="METHOD=PATH",
                        help="a checkout of the pinned official commit (tools/oracle.py OFFICIAL): bam, pfenet, hsnet")
    parser.add_argument("--torchvision", type=Path, help="hsnet: a directory holding the torchvision package the "
                        "oracle pins (tools/oracle.py --torchvision); default: the installed torchvision")
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16"], choices=VARIANTS)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--fssmeta-train-batch", type=int, help="fssmeta's batch in the train row (default: "
                        "--train-batch); the ratio is then per episode")
    parser.add_argument("--memory", action="store_true", help="also each side's peak memory (child processes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # method,row,variant,side: one side's peak memory
    args = parser.parse_args()
    checkouts = official_checkouts(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scratch = Path(tempfile.mkdtemp(prefix="fssmeta-compare-"))
    os.chdir(scratch)  # the official constructors read initmodel/... relative to the working directory
    if args.child:
        child(args, checkouts, device, scratch)
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, input {args.size}, official = tools/oracle.py's pinned commits")
    print(f"{'method':7} {'row':9} {'fssmeta':8} {'official ms':>12} {'fssmeta ms':>11} {'ratio':>6}"
          + (f" {'official MiB':>12} {'fssmeta MiB':>12} {'alone':>6}" if args.memory else ""))
    for method, path in checkouts.items():
        with official_context(device):
            module = oracle.import_official(method, path)
        for row in args.rows:
            shot, batch = row_shape(row, args.train_batch)
            pair = Pair(method, path, module, scratch, shot, args.size, device)
            inputs = batch_inputs(args.size, shot, batch)
            ours_batch = args.fssmeta_train_batch if row == "train" and args.fssmeta_train_batch else batch
            ours_inputs = batch_inputs(args.size, shot, ours_batch) if ours_batch != batch else inputs
            for variant in args.variants:
                r = run_row(pair, row, variant, inputs, args.repeats, ours_inputs)
                label = variant + (f" b{ours_batch}" if ours_batch != batch else "")
                line = (f"{method:7} {row:9} {label:8} {r['official']:>12,.0f} {r['fssmeta']:>11,.0f} "
                        f"{r['ratio']:>6.2f}")
                print(line, end="" if args.memory else "\n", flush=True)
                if args.memory:
                    sides = [alone(f"{method},{row},{variant},{side}", args, checkouts) for side in ("official", "fssmeta")]
                    print("".join(f" {side['peak_mib']:>12,.0f}" for side in sides)
                          + f" {sides[0]['ms'] / sides[1]['ms']:>6.2f}", flush=True)
            del pair
    print("ratio = official ms / fssmeta ms per episode (> 1: fssmeta faster); eval rows batch 1, train / "
          f"backbone at batch {args.train_batch} (fssmeta's train batch: bN where it differs); medians of "
          f"{args.repeats} interleaved calls after one warm-up each")


def official_checkouts(args: argparse.Namespace) -> dict[str, Path]:
    """METHOD -> its checked checkout, from `--official`; HSNet's torchvision made importable (`--torchvision`)."""
    checkouts = {}
    for item in args.official:
        method, _, path = item.partition("=")
        if method not in ("bam", "pfenet", "hsnet") or not path:
            sys.exit(f"--official {item!r}: expected bam=PATH, pfenet=PATH or hsnet=PATH")
        checkouts[method] = Path(path).resolve()
        oracle.check_checkout(method, checkouts[method])
    if "hsnet" in checkouts:
        with oracle.cpu_only():
            oracle.torchvision_models(args.torchvision.resolve() if args.torchvision else None)
    return checkouts


def child(args: argparse.Namespace, checkouts: dict[str, Path], device: torch.device, scratch: Path) -> None:
    """One side of one row: a warm-up, then `--repeats` timed calls; its peak memory over all of them and the
    median ms as JSON (both sides at the row's `--train-batch`)."""
    method, row, variant, side = args.child.split(",")
    shot, batch = row_shape(row, args.train_batch)
    with official_context(device):
        module = oracle.import_official(method, checkouts[method])
    pair = Pair(method, checkouts[method], module, scratch, shot, args.size, device)
    inputs = batch_inputs(args.size, shot, batch)
    if side == "official":  # drop the other side's model before measuring
        pair.ours = pair.ours_opt = None
    else:
        pair.official = pair.official_opt = None
    reset_peak()
    kind = "backbone" if row == "backbone" else ("train" if row == "train" else "eval")
    if side == "official":
        args_ = pair.official_inputs(inputs)
        with official_context(device):
            call = functools.partial(getattr(pair, f"official_{kind}"), *args_)
            times = [timed(call, device) for _ in range(1 + args.repeats)]
    else:
        ep = fssmeta_episode(inputs, oracle.TRAIN_CLASS if row == "train" else 1, pair.device)
        pair.channels_last(variant == "bf16-cl")
        call = functools.partial(getattr(pair, f"ours_{kind}"), ep, "off" if variant == "fp32" else "all")
        times = [timed(call, device) for _ in range(1 + args.repeats)]
    print(json.dumps({"peak_mib": read_peak(device), "ms": statistics.median(times[1:])}))


def reset_peak() -> None:
    """Start the peak-memory count here: CUDA's allocator statistics, and on Linux the process's peak RSS
    (writing 5 to /proc/self/clear_refs resets VmHWM), so model construction does not count."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def read_peak(device: torch.device) -> float:
    """Peak MiB since `reset_peak`: max allocated on CUDA; VmHWM on Linux CPU (else max RSS, all run long)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
