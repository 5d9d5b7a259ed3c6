"""Meta-memory read latency: the FAISS paths (flat, ivf) of `MetaMemory.read` against the exact torch path, over
bank size N, channels d and batch, with index build time, agreement with the torch result and peak memory.

Run: `.venv/bin/python benchmarks/memory.py [--quick] [--max-gib 6] [--nprobe 8] [--device cuda]
[--omp-wait-policy passive]`. Each (kind, N, d) runs in its own subprocess, so its peak memory is its own;
rows whose estimated peak exceeds `--max-gib` are skipped. Inside a subprocess the FAISS module reads the
torch module's tensors (built on the meta device, then assigned the bank), so both read the same items.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import faiss
import torch

from fssmeta.models.memory import MetaMemory

GIB = 2**30
# Peak (N, d) float32 arrays alive at once. torch: the two buffers plus one more (the `rand + 0.5` temporary
# at construction, then the whole-bank F.normalize copy `_retrieve` makes on every read). FAISS kinds add
# their two indexes (a full copy of each buffer) and, while building, the normalised copy they are built from;
# ivf also its k-means training sample (up to 256 points per list, i.e. up to one more copy).
BANK_COPIES = {"torch": 3, "flat": 5, "ivf": 6}
PROCESS_GIB = 0.3  # torch + faiss imported, nothing allocated


def nlist_for(num_items: int) -> int:
    """~sqrt(N) lists, but at least 39 training points per list (FAISS warns below that)."""
    return max(1, min(round(math.sqrt(num_items)), num_items // 39))


def estimate_gib(kind: str, num_items: int, channels: int, batch: int) -> float:
    """Peak GiB of one subprocess; every kind also makes the torch reference read, with its (B, N) similarities."""
    return PROCESS_GIB + (BANK_COPIES[kind] * channels + 2 * batch) * num_items * 4 / GIB


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    where = f"CUDA {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU"
    return (f"machine: {cpu} ({platform.machine()}), {os.cpu_count()} cores, {ram:.0f} GiB RAM; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
            f"({faiss.omp_get_max_threads()} OpenMP threads, {gpus} GPUs); device {device} ({where})")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_read(memory: MetaMemory, mu: torch.Tensor, sigma: torch.Tensor) -> float:
    start = time.perf_counter()
    memory.read(mu, sigma)
    sync(mu.device)
    return time.perf_counter() - start


def steady_reads(memory: MetaMemory, mu: torch.Tensor, sigma: torch.Tensor, repeats: int,
                 budget_s: float) -> list[float]:
    """Read latencies (s): `repeats` reads, fewer (at least 3) once `budget_s` is spent."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        times.append(timed_read(memory, mu, sigma))
    return times


def max_diff(got: tuple, want: tuple) -> float:
    return max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))


def twin(bank: MetaMemory, kind: str, top_k: int) -> MetaMemory:
    """A `kind` module reading `bank`'s tensors (no copy): built on the meta device, then assigned the bank."""
    with torch.device("meta"):
        memory = MetaMemory(num_items=bank.num_items, channels=bank.channels, top_k=top_k, index=kind,
                            nlist=nlist_for(bank.num_items))
    memory.load_state_dict(bank.state_dict(), assign=True)
    assert memory.means.data_ptr() == bank.means.data_ptr()
    return memory


def set_nprobe(memory: MetaMemory, nprobe: int) -> None:
    # Benchmark-only: MetaMemory fixes nprobe = nlist (exhaustive); this edits its built indexes in place.
    for index in memory._current_indexes():
        index.nprobe = nprobe


def run_one(kind: str, n: int, d: int, args: argparse.Namespace) -> list[dict]:
    """Every batch (and nprobe) row of one kind on one (N, d) bank, in this process."""
    device = torch.device(args.device)
    bank = MetaMemory(num_items=n, channels=d, top_k=args.top_k, index="torch",
                      generator=torch.Generator().manual_seed(args.seed)).to(device)
    g = torch.Generator().manual_seed(args.seed + 1)
    queries = {b: (torch.randn(b, d, generator=g).to(device), (torch.rand(b, d, generator=g) + 0.5).to(device))
               for b in args.batches}
    reference = {b: bank.read(*queries[b]) for b in args.batches}  # also the torch kind's warm-up read
    repeats = args.repeats if n * d < 10**8 else max(3, args.repeats // 2)
    memory = bank if kind == "torch" else twin(bank, kind, args.top_k)
    rows = []
    for i, batch in enumerate(args.batches):
        mu, sigma = queries[batch]
        first = timed_read(memory, mu, sigma) if kind != "torch" and i == 0 else None  # builds, then reads
        times = steady_reads(memory, mu, sigma, repeats, args.budget_s)
        build = None if first is None else max(first - statistics.median(times), 0.0)
        diff = None if kind == "torch" else max_diff(memory.read(mu, sigma), reference[batch])
        probe = f"{memory.nlist}/{memory.nlist}" if kind == "ivf" else "-"
        rows.append(dict(batch=batch, probe=probe, build=build, times=times, diff=diff))
        for nprobe in args.nprobe if kind == "ivf" else []:
            if nprobe >= memory.nlist:
                continue
            set_nprobe(memory, nprobe)
            try:
                times = steady_reads(memory, mu, sigma, repeats, args.budget_s)
                diff = max_diff(memory.read(mu, sigma), reference[batch])
                rows.append(dict(batch=batch, probe=f"{nprobe}/{memory.nlist}", build=None, times=times, diff=diff))
            except RuntimeError as error:  # too few items in the probed lists for top_k
                rows.append(dict(batch=batch, probe=f"{nprobe}/{memory.nlist}", error=str(error)))
            finally:
                set_nprobe(memory, memory.nlist)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    if device.type == "cuda":
        peak = max(peak, torch.cuda.max_memory_allocated(device) / GIB)
    for r in rows:
        r["peak_gib"] = peak
    return rows


def format_row(kind: str, n: int, d: int, batch: int, r: dict) -> str:
    head = f"{kind:<6}{n:>10,}{d:>6}{batch:>6}{r.get('probe', ''):>11}"
    if "times" not in r:
        return f"{head}  {r['error']}"
    median = statistics.median(r["times"])
    build = "-" if r["build"] is None else f"{r['build']:.3f}"
    diff = "reference" if r["diff"] is None else f"{r['diff']:.1e}"
    return (f"{head}{build:>9}{median * 1e3:>10.2f}{1 / median:>10.1f}{len(r['times']):>5}{diff:>11}"
            f"{r['peak_gib']:>7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6], help="bank sizes N")
    parser.add_argument("--channels", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--kinds", nargs="+", choices=["flat", "ivf", "torch"], default=["flat", "ivf", "torch"])
    parser.add_argument("--nprobe", nargs="*", type=int, default=[],
                        help="extra ivf rows with the built indexes' nprobe set to each value (< nlist)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timed reads per row (halved for big banks)")
    parser.add_argument("--budget-s", type=float, default=5.0, help="stop a row's reads past this (min 3 reads)")
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip rows estimated to need more memory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--omp-wait-policy", choices=["active", "passive"],
                        help="OMP_WAIT_POLICY for the subprocesses (default: inherited)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="N 1e3 and 1e4, d 512, batch 8, 5 reads")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.channels, args.batches, args.repeats = [1e3, 1e4], [512], [8], 5
    if args.one:
        kind, n, d = args.one.split(",")
        print(json.dumps(run_one(kind, int(n), int(d), args)))
        return
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    print(machine(torch.device(args.device)))
    # Other work on the machine shows here; during the run the spinning OpenMP threads load it themselves.
    print(f"OMP_WAIT_POLICY {env.get('OMP_WAIT_POLICY', 'unset')}; load average before the run "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"items and queries random (the bank's initial state); top_k {args.top_k}; ivf nlist ~ sqrt(N), "
          "at most N/39. MetaMemory sets nprobe = nlist, so its ivf search is exhaustive (exact, and no "
          "faster than flat); the nprobe < nlist rows are set by this benchmark only.")
    print("build s: first read on a fresh module minus a steady read (both indexes; every write triggers the "
          "same rebuild on the next read). read ms: median of the timed reads (reps). max|diff|: largest "
          "absolute difference of (mu_mem, sigma_mem) from the torch exact read. peak: the subprocess's peak "
          "RSS in GiB (all rows of one kind, N and d share it).\n")
    print(f"{'kind':<6}{'N':>10}{'d':>6}{'batch':>6}{'nprobe':>11}{'build s':>9}{'read ms':>10}{'reads/s':>10}"
          f"{'reps':>5}{'max|diff|':>11}{'peak':>7}")
    passthrough = [a for a in sys.argv[1:] if a != "--quick"]
    quick = ["--repeats", str(args.repeats), "--batches", *map(str, args.batches)] if args.quick else []
    start = time.perf_counter()
    for n in (int(s) for s in args.sizes):
        for d in args.channels:
            for kind in args.kinds:
                needed = estimate_gib(kind, n, d, max(args.batches))
                if needed > args.max_gib:
                    for batch in args.batches:
                        print(f"{kind:<6}{n:>10,}{d:>6}{batch:>6}  skipped (needs {needed:.1f} GiB)", flush=True)
                    continue
                out = subprocess.run([sys.executable, __file__, *passthrough, *quick, "--one", f"{kind},{n},{d}"],
                                     capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(f"{kind:<6}{n:>10,}{d:>6}  failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                for r in json.loads(out.stdout.strip().splitlines()[-1]):
                    print(format_row(kind, n, d, r["batch"], r), flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; memory cap {args.max_gib} GiB (estimates)")


if __name__ == "__main__":
    main()
