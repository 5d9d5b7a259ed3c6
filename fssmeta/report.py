"""The report: results table (Markdown + JSON metrics), training curves, per-class IoU and a qualitative grid,
rendered to PNG with matplotlib (imported lazily, Agg backend) so they can be looked at offline."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fssmeta.config import Config, ModelConfig, TTAConfig
from fssmeta.cross_domain import source_label, target_report
from fssmeta.data.dataset import EpisodeDataset, IndexSource
from fssmeta.data.episode_lists import list_path, load_episode_list
from fssmeta.data.folds import class_names
from fssmeta.data.io import DataError, atomic_path, read_json, write_json_atomic, write_text_atomic
from fssmeta.data.prepare import load_index
from fssmeta.data.transforms import TestTransform, denormalize
from fssmeta.episode import IGNORE_INDEX
from fssmeta.fscs import add_way_metrics, fscs_markdown
from fssmeta.losses import resize_logits
from fssmeta.models import METHODS


def row_label(label: str) -> str:
    """A table row's label as shown: `crnet+finetune` -> `crnet+finetune (approximate)` for a method whose
    record calls itself approximate (no official code to follow), so such rows never pass as faithful."""
    method = METHODS.get(label.split("+")[0])
    return f"{label} (approximate)" if method is not None and "approximate" in method.summary else label


def collect(cfg: Config, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per-fold evaluation JSONs (`<eval.out>/fold<k>/<method>.json`) gathered into one dict per method."""
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        for fold in cfg.eval.folds:
            path = Path(cfg.eval.out) / f"fold{fold}" / f"{method}.json"
            report = read_json(path, f"evaluation of {method} (run the evaluate stage)")
            entry = out.setdefault(method, {"protocol": report["protocol"], "results": {}})
            entry["results"] |= report["results"]
    return out


def metrics(collected: dict[str, dict[str, Any]], shots: tuple[int, ...]) -> dict[str, Any]:
    """The `dvc metrics show` view: per method and shot, the fold mean, and per fold the mean and std."""
    table: dict[str, Any] = {}
    for method, entry in collected.items():
        for shot in shots:
            key = f"{shot}shot"
            per_fold = {fold: r[key] for fold, r in entry["results"].items()}
            table.setdefault(method, {})[key] = add_way_metrics({  # + FS-CS er_<N>way, miou_<N>way when scored
                "miou": statistics.fmean(r["miou_mean"] for r in per_fold.values()),
                "fb_iou": statistics.fmean(r["fbiou_mean"] for r in per_fold.values()),
                **{fold: {"miou": r["miou_mean"], "miou_std": r["miou_std"], "fb_iou": r["fbiou_mean"]}
                   for fold, r in per_fold.items()},
            }, per_fold)
    return table


def markdown_table(collected: dict[str, dict[str, Any]], shots: tuple[int, ...]) -> str:
    """mIoU mean +- std over seeds per fold and shot, the fold mean, FB-IoU; the protocol below it."""
    folds = sorted(next(iter(collected.values()))["results"])
    header = "| method | shot | " + " | ".join(folds) + " | mean | FB-IoU |"
    lines = [header, "|" + "---|" * (len(folds) + 4)]
    for method, entry in collected.items():
        for shot in shots:
            key = f"{shot}shot"
            cells = [f"{100 * entry['results'][f][key]['miou_mean']:.1f} ± {100 * entry['results'][f][key]['miou_std']:.1f}"
                     for f in folds]
            mean = statistics.fmean(entry["results"][f][key]["miou_mean"] for f in folds)
            fb = statistics.fmean(entry["results"][f][key]["fbiou_mean"] for f in folds)
            lines.append(f"| {row_label(method)} | {shot} | " + " | ".join(cells) + f" | **{100 * mean:.1f}** | {100 * fb:.1f} |")
    protocol = next(iter(collected.values()))["protocol"]
    lines += ["", "mIoU in %: class-wise accumulated over each list, mean ± std over test seeds.", "",
              "Protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items())]
    return "\n".join(lines) + "\n"


def collect_targets(cfg: Config, methods: list[str]) -> dict[str, dict[str, Any]]:
    """Cross-domain results of the methods that have them under `eval.target_source`
    (`evaluation.target_report`), one row label per method and regime of `eval.target_regimes` (`bam`,
    `bam+tta`: separate rows, never mixed); empty when no target was configured."""
    found = {}
    for method in methods:
        for regime in cfg.eval.target_regimes:
            report = target_report(cfg, method, regime)
            if report is not None:
                found[method if regime == "none" else f"{method}+{regime}"] = report
    return found


def target_metrics(collected: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`dvc metrics show` view of the cross-domain results: per method and shot, each target and the mean."""
    return {method: {shot: {"mean": mean, **{name: r[shot]["miou_mean"] for name, r in report["results"].items()}}
                     for shot, mean in report["mean_over_targets"].items()}
            for method, report in collected.items()}


def targets_markdown(collected: dict[str, dict[str, Any]]) -> str:
    """Per target and shot: mIoU mean +- std over seeds, and the mean over targets."""
    first = next(iter(collected.values()))
    names = list(first["results"])
    lines = ["| method | shot | " + " | ".join(names) + " | mean |", "|" + "---|" * (len(names) + 3)]
    for method, report in collected.items():
        for shot, mean in report["mean_over_targets"].items():
            cells = [f"{100 * report['results'][n][shot]['miou_mean']:.1f} ± {100 * report['results'][n][shot]['miou_std']:.1f}"
                     for n in names]
            lines.append(f"| {row_label(method)} | {shot.removesuffix('shot')} | " + " | ".join(cells)
                         + f" | **{100 * mean:.1f}** |")
    lines += ["", f"Source: {source_label(first)}; 1-way episodes per target; protocol: "
              + ", ".join(f"{k}={v}" for k, v in first["protocol"].items())]
    return "\n".join(lines) + "\n"


def _switches(method: str, memory: bool, mining: bool, **options: Any) -> Callable[[ModelConfig], dict[str, Any]]:
    """`model.method` with the memory and mining switches set, and `options` updating `model.<method>`."""
    def update(model: ModelConfig) -> dict[str, Any]:
        changes = {"method": method, "memory": model.memory.model_copy(update={"enabled": memory}),
                   "mining": model.mining.model_copy(update={"enabled": mining})}
        if options:
            changes[method] = {**model.options(method), **options}
        return changes

    return update


# The ablation rows (benchmarks/ablation.py): name -> the model-config update that makes it.
ABLATION_VARIANTS: dict[str, Callable[[ModelConfig], dict[str, Any]]] = {
    "bam": _switches("bam", False, False),
    "bam+memory": _switches("bam", True, False),
    "bam+mining": _switches("bam", False, True),
    "flagship": _switches("bam", True, True),
    "ntrenet": _switches("ntrenet", False, False),
    "hdmnet": _switches("hdmnet", False, False),
    "sccan": _switches("sccan", False, False),
    # The HSNet family (its frozen backbone: the stage-1 encoder at output stride 32 on the synthetic default)
    "hsnet": _switches("hsnet", False, False, support_masking="feature"),
    "hsnet+hm": _switches("hsnet", False, False, support_masking="hybrid"),
    "asnet": _switches("asnet", False, False, support_masking="none"),
    "asnet+hm": _switches("asnet", False, False, support_masking="hybrid"),
}


def ablation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The ablation (benchmarks/ablation.py) as rows: one per (variant, regime, shot) and the baseline's, each
    score a (mean, std) over the TRAINING seeds of that variant (the test-seed mean of every run first).
    Keys: label, variant, regime, shot, seeds, in_domain, targets ({name: (mean, std)}), mean. A variant's own
    `tta` record (its tta rows scored under other settings than the file's `tta`) labels its tta rows."""

    def spread(values: list[float]) -> tuple[float, float] | None:
        return (statistics.fmean(values), statistics.pstdev(values)) if values else None

    shared_tta = {**TTAConfig().model_dump(mode="json"), **(results.get("tta") or {})}  # keys added since: defaults

    def tta_label(tta: dict[str, Any] | None) -> str:
        """A variant scored under other tta settings than the file's (`benchmarks/ablation.py --score-only`):
        the keys that differ, on its tta rows."""
        changed = {k: v for k, v in (tta or {}).items() if shared_tta.get(k) != v}
        return "".join(f" (tta.{k}={v})" for k, v in changed.items())

    rows = []
    entries = [(name, v.get("runs", {}), v.get("overrides", []), v.get("tta"))
               for name, v in results.get("variants", {}).items()]
    if results.get("baseline"):
        entries.append(("baseline", {"-": results["baseline"]}, [], None))
    for name, runs, overrides, tta in entries:
        regimes = sorted({r for run in runs.values() for r in run.get("targets", {})}, key=("none", "tta", "finetune").index)
        for regime in regimes or ["none"]:
            for shot in results.get("shots", []):
                key = f"{shot}shot"
                done = [run for run in runs.values() if key in run.get("in_domain", {})]
                if not done:
                    continue
                targets = sorted({t for run in done for t in run.get("targets", {}).get(regime, {})})
                per_target = {t: spread([run["targets"][regime][t][key] for run in done
                                         if key in run["targets"].get(regime, {}).get(t, {})]) for t in targets}
                means = [statistics.fmean(run["targets"][regime][t][key] for t in targets) for run in done
                         if targets and all(key in run["targets"].get(regime, {}).get(t, {}) for t in targets)]
                label = (name + ("" if regime == "none" else f"+{regime}") + "".join(f" ({o})" for o in overrides)
                         + (tta_label(tta) if regime == "tta" else ""))
                rows.append({"label": label, "variant": name, "regime": regime, "shot": shot, "seeds": len(done),
                             "in_domain": spread([run["in_domain"][key] for run in done]) if regime == "none" else None,
                             "targets": per_target, "mean": spread(means)})
    return rows


def ablation_markdown(results: dict[str, Any]) -> str:
    """The ablation table: per variant, regime and shot, in-domain mIoU, each target's mIoU and their mean, as
    mean ± std over training seeds; `none` and `tta` (`<variant>+tta`) are separate rows."""
    rows = ablation_rows(results)
    if not rows:
        return "No ablation results.\n"
    targets = sorted({t for row in rows for t in row["targets"]})

    def cell(score: tuple[float, float] | None) -> str:
        return "—" if score is None else f"{100 * score[0]:.1f} ± {100 * score[1]:.1f}"

    lines = ["| variant | shot | training seeds | in-domain | " + " | ".join(targets) + " | cross-domain mean |",
             "|" + "---|" * (len(targets) + 5)]
    for row in rows:
        mean = "—" if row["mean"] is None else f"**{cell(row['mean'])}**"
        lines.append(f"| {row['label']} | {row['shot']} | {row['seeds']} | {cell(row['in_domain'])} | "
                     + " | ".join(cell(row["targets"].get(t)) for t in targets) + f" | {mean} |")
    tta = results.get("tta")
    lines += ["", f"Source fold {results['source_fold']}; mIoU in %, mean ± std over the training seeds "
              f"{results.get('seeds')} (each run: the mean over test seeds {results['test_seeds']}, "
              f"{results['episodes_per_list']} episodes per list); the non-learned baseline shares the one "
              f"stage-1 encoder (no training seed); `+tta`: {tta}; training {results['train']}; "
              f"{results['machine']}."]
    return "\n".join(lines) + "\n"


def plot_ablation_targets(results: dict[str, Any], path: Path) -> None:
    """Per shot, a bar per (variant, regime) for each target and the cross-domain mean, with the
    training-seed std as error bars."""
    plt = _pyplot()
    rows = ablation_rows(results)
    shots = sorted({row["shot"] for row in rows})
    targets = sorted({t for row in rows for t in row["targets"]}) + ["mean"]
    fig, axes = plt.subplots(1, max(len(shots), 1), figsize=(6 * max(len(shots), 1), 4), squeeze=False)
    for ax, shot in zip(axes[0], shots, strict=False):
        shown = [row for row in rows if row["shot"] == shot]
        width = 0.8 / max(len(shown), 1)
        for i, row in enumerate(shown):
            scores = [row["targets"].get(t) if t != "mean" else row["mean"] for t in targets]
            heights = [100 * s[0] if s else 0.0 for s in scores]
            errors = [100 * s[1] if s else 0.0 for s in scores]
            ax.bar(np.arange(len(targets)) + i * width, heights, width, yerr=errors, label=row["label"], capsize=2)
        ax.set_xticks(np.arange(len(targets)) + 0.4 - width / 2, targets)
        ax.set_title(f"{shot}-shot, cross-domain mIoU (%)")
        ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))  # below the bars
    _save(fig, path)


def sweep_markdown(trials: dict[str, Any], best: dict[str, Any]) -> str:
    """The tune stage's trials (values, epochs run, best validation mIoU, status) and the values it chose."""
    rows = trials.get("trials") or []
    if not rows:
        return f"No sweep: {best.get('note', 'tune.trials is 0')}; training used params.yaml as it is.\n"
    keys = list(rows[0]["config"])
    lines = ["| trial | " + " | ".join(f"`{k}`" for k in keys) + " | epochs | best val mIoU | status |",
             "|---|" + "---|" * len(keys) + "---|---|---|"]
    for t in rows:
        values = " | ".join(f"{t['config'][k]:.4g}" if isinstance(t["config"][k], float) else str(t["config"][k])
                            for k in keys)
        score = "-" if t["score"] is None else f"{100 * t['score']:.1f}"
        lines.append(f"| {t['trial']} | {values} | {t['epochs']} | {score} | {t['status']} |")
    chosen = ", ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}" for k, v in best["overrides"].items())
    return (f"Trials on fold {best['fold']}, {best['shot']}-shot, scored on its validation episodes "
            f"({best['sweep']}).\n\n" + "\n".join(lines) + f"\n\nTraining used: {chosen}.\n")


def stages_markdown(stages: Path) -> str:
    """The stages' recorded run times (`<report.out>/stages/*.json`, written by each DVC stage as it ends;
    a stage DVC skipped keeps its earlier time, so each row says when it finished), longest first."""
    rows = [read_json(path, "stage time") for path in sorted(stages.glob("*.json"))]
    rows.sort(key=lambda r: -r["seconds"])
    total = sum(r["seconds"] for r in rows)
    lines = ["| stage | seconds | share | finished (UTC) |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.0f} | {100 * r['seconds'] / total:.0f}% | {r['finished']} |"
              for r in rows]
    lines.append(f"| all recorded stages | {total:.0f} | 100% | |")
    return "\n".join(lines) + "\n\nThe report stage records its own time after writing this, and register runs after it.\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_training_curves(histories: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Training loss and validation mIoU per epoch, one line per run."""
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in sorted(histories.items()):
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label=name)
        if all("val_miou" in h for h in history):
            ax_val.plot(epochs, [100 * h["val_miou"] for h in history], marker="o", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_val.set(xlabel="epoch", ylabel="validation mIoU (%)", title="validation mIoU (checkpoint selection)")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)


def plot_per_class(collected: dict[str, dict[str, Any]], shot: int, names: tuple[str, ...], path: Path) -> None:
    """Per-class IoU (mean over seeds) of every method at `shot`, all folds' novel classes side by side."""
    plt = _pyplot()
    per_method: dict[str, dict[int, float]] = {}
    for method, entry in collected.items():
        for result in entry["results"].values():
            seeds = result[f"{shot}shot"]["seeds"]
            for c in seeds[0]["per_class"]:
                per_method.setdefault(method, {})[int(c)] = statistics.fmean(s["per_class"][c] for s in seeds)
    classes = sorted({c for values in per_method.values() for c in values})
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes)), 4))
    width = 0.8 / max(len(per_method), 1)
    for i, (method, values) in enumerate(per_method.items()):
        ax.bar(np.arange(len(classes)) + i * width, [100 * values.get(c, 0.0) for c in classes], width, label=method)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2)
    ax.set_xticklabels([names[c - 1] for c in classes], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="IoU (%)", title=f"per-class IoU, {shot}-shot (novel classes of every fold)")
    ax.legend(fontsize=7)
    _save(fig, path)


@torch.no_grad()
def plot_qualitative(cfg: Config, model: torch.nn.Module, fold: int, shot: int, path: Path, count: int = 4) -> None:
    """Support (with its mask), query, prediction and ground truth for the first episodes of the seed-0 list."""
    plt = _pyplot()
    episodes = load_episode_list(list_path(cfg.episodes.out, fold, "test", shot, cfg.eval.episode_order,
                                           cfg.episodes.test_seeds[0]))["episodes"][:count]
    if not episodes:
        raise DataError(f"fold {fold}: empty test list, nothing to show")
    size = cfg.eval.size
    dataset = EpisodeDataset(episodes, IndexSource(load_index(cfg.data.prepared)), TestTransform("resized", size))
    device = next(model.parameters()).device
    fig, axes = plt.subplots(len(episodes), 4, figsize=(10, 2.6 * len(episodes)), squeeze=False)
    for row, i in enumerate(range(len(episodes))):
        ep = dataset[i]
        batch = type(ep)(*(t[None].to(device) for t in ep))
        logits = resize_logits(model(batch).logits.float(), ep.query_mask.shape[-2:])
        pred = logits.argmax(1)[0].cpu().numpy()
        support = denormalize(ep.support_imgs[0])
        overlay = support.copy()
        overlay[ep.support_masks[0].numpy() == 1] = (0.5 * overlay[ep.support_masks[0].numpy() == 1] + [0, 127, 0]).astype(np.uint8)
        truth = ep.query_mask.numpy().astype(float)
        truth[truth == IGNORE_INDEX] = 0.5
        for col, (image, title) in enumerate([(overlay, f"support (class {ep.class_id.item()})"),
                                              (denormalize(ep.query_img), "query"), (pred, "prediction"),
                                              (truth, "ground truth")]):
            axes[row, col].imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
            axes[row, col].set_title(title, fontsize=8)
            axes[row, col].axis("off")
    _save(fig, path)


def write_report(cfg: Config, out: Path, methods: list[str], histories: dict[str, list[dict[str, float]]],
                 qualitative_model: torch.nn.Module | None) -> dict[str, Any]:
    """Everything the report stage writes: report.md, metrics.json, plots/*.png. Returns the metrics."""
    collected = collect(cfg, methods)
    table = metrics(collected, cfg.eval.shots)
    protocol = next(iter(collected.values()))["protocol"]
    targets = collect_targets(cfg, methods)
    cross = {"cross_domain": target_metrics(targets)} if targets else {}
    write_json_atomic(out / "metrics.json", {"protocol": protocol, **table, **cross})
    sections = ["# Results\n\n## In-domain (novel classes of the source dataset)\n\n"
                + markdown_table(collected, cfg.eval.shots)]
    fscs = fscs_markdown(collected, cfg.eval.shots)
    if fscs:
        sections.append(f"## FS-CS (iFSL: {cfg.episodes.ways}-way classification and segmentation)\n\n" + fscs)
    if targets:
        sections.append("## Cross-domain (PATNet protocol)\n\n" + targets_markdown(targets))
    tuned = Path(cfg.tune.out)
    if (tuned / "trials.json").is_file() and (tuned / "best.yaml").is_file():
        best = yaml.safe_load((tuned / "best.yaml").read_text())
        sections.append("## Hyperparameter sweep (tune stage)\n\n"
                        + sweep_markdown(read_json(tuned / "trials.json", "sweep trials"), best))
    ablation = Path(cfg.report.ablation)
    if cfg.report.ablation and ablation.is_file():
        ablation_results = read_json(ablation, "ablation results")
        plot_ablation_targets(ablation_results, out / "plots" / "ablation_targets.png")
        sections.append(f"## Ablation of the flagship ({ablation}, from benchmarks/ablation.py)\n\n"
                        + ablation_markdown(ablation_results) + "\n![ablation per target](plots/ablation_targets.png)\n")
    if any((out / "stages").glob("*.json")):
        sections.append("## Where `dvc repro` spent its time\n\n" + stages_markdown(out / "stages"))
    sections.append("![training curves](plots/training_curves.png)\n![per-class IoU](plots/per_class_iou.png)\n"
                    "![qualitative](plots/qualitative.png)\n")
    write_text_atomic(out / "report.md", "\n".join(sections))
    plots = out / "plots"
    plot_training_curves(histories, plots / "training_curves.png")
    plot_per_class(collected, cfg.eval.shots[0], class_names(cfg.data.dataset), plots / "per_class_iou.png")
    if qualitative_model is not None:
        plot_qualitative(cfg, qualitative_model, cfg.eval.folds[0], cfg.eval.shots[0], plots / "qualitative.png",
                         cfg.report.qualitative_episodes)
    return {**table, **cross}


def load_histories(cfg: Config, run_dirs: dict[str, Path]) -> dict[str, list[dict[str, float]]]:
    return {name: json.loads((d / "history.json").read_text())["history"]
            for name, d in run_dirs.items() if (d / "history.json").is_file()}
