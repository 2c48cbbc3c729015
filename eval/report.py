"""The report card of one checkpoint: every task's metrics in one table, plus plots, from a suite's results.

``report.md`` holds the table of metrics and links the PNGs beside it: ``metrics.png`` (each task's headline
number), ``curves.png`` (pretraining loss and learning rate, when the checkpoint's folder has the ``log.jsonl``
that ``pretrain/main.py`` writes), ``davis_overlays.png`` (predicted masks over frames) and ``per_class.png``
(k-NN accuracy per class).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from eval.tasks import TASKS, task_spec  # noqa: E402

logger = logging.getLogger(__name__)

def step_results(spec: dict, output_dir: Path) -> dict[str, dict | None]:
    """step (or step/array-element) -> its results.json, None when it has none (failed, skipped, not run)."""
    found: dict[str, dict | None] = {}
    for name in spec["steps"]:
        folder = output_dir / name
        elements = sorted(p.parent for p in folder.glob("*=*/results.json"))
        for f in elements or [folder]:
            path = f / "results.json"
            key = str(f.relative_to(output_dir))
            found[key] = json.loads(path.read_text()) if path.is_file() else None
    return found


def headline(results: dict) -> tuple[str, float] | None:
    """(metric, percent) of a task's results.json, as its TaskSpec declares; None for pretraining or a task whose
    results lack the metric."""
    task = results.get("task")
    return task_spec(task).headline_metric(results.get("metrics", {})) if task in TASKS else None


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metrics_plot(results: dict[str, dict | None], path: Path) -> Path | None:
    bars = [(f"{name}\n{h[0]}", h[1]) for name, r in results.items() if r and (h := headline(r))]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(1.4 * len(bars) + 2, 3.6))
    ax.bar(range(len(bars)), [v for _, v in bars], color="#4c72b0")
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [n for n, _ in bars], fontsize=7)
    ax.set_ylabel("percent (DAVIS: J&F x 100)")
    ax.set_title("headline metric per task")
    return _save(fig, path)


def _curves_plot(log: Path, path: Path) -> Path | None:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    if not train:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    a.set_xlabel("step")
    a.set_ylabel("BAM loss")
    b.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1, color="#dd8452")
    b.set_xlabel("step")
    b.set_ylabel("learning rate")
    fig.suptitle(f"pretraining ({log})", fontsize=8)
    return _save(fig, path)


def _overlays_plot(folder: Path, path: Path, most: int = 3) -> Path | None:
    paths = sorted(folder.glob("*.png"))[:most]
    images = [Image.open(p) for p in paths]
    if not images:
        return None
    width = 9.0
    heights = [width * im.height / im.width for im in images]
    fig, axes = plt.subplots(len(images), 1, figsize=(width, sum(heights) + 0.4 * len(images)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, image, source in zip(axes[:, 0], images, paths):
        ax.imshow(image)
        ax.set_title(f"{source.stem}: ground truth (left), prediction (right)", fontsize=8)
        ax.axis("off")
    return _save(fig, path)


def _per_class_plot(results: dict, path: Path) -> Path | None:
    per_class = {c: v for c, v in (results.get("per_class_top1") or {}).items() if v is not None}
    if not per_class:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(per_class) + 2), 3.4))
    ax.bar(range(len(per_class)), list(per_class.values()), color="#55a868")
    ax.set_xticks(range(len(per_class)), list(per_class), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"k-NN top-1 (k={results.get('per_class_k')}), percent")
    ax.set_ylim(0, 100)
    return _save(fig, path)


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def write_report(spec: dict, output_dir: str | Path, checkpoint: str | None = None) -> Path:
    output_dir = Path(output_dir)
    results = step_results(spec, output_dir)
    done = {k: r for k, r in results.items() if r}
    first = next(iter(done.values()), {})
    if checkpoint:
        model = f"`{checkpoint}` ({first.get('checkpoint_format') or '?'} format, {first.get('arch') or '?'})"
    else:
        model = f"random-init {first.get('arch') or '?'} (no --checkpoint: a baseline, not a trained model)"
    lines = [f"# Report card: {spec['name']}", "", f"Model: {model}", ""]
    samples = sorted(k for k, r in done.items() if r.get("data", {}).get("builtin_sample"))
    if samples:
        lines += [f"Built-in samples (generated from installed packages' data, not the real data sets): "
                  f"{', '.join(samples)}. They show the pipeline works; their numbers are not the paper's.", ""]
    lines += ["| step | task | metric | value | seconds |", "|---|---|---|---:|---:|"]
    for name, r in results.items():
        if r is None:
            lines.append(f"| {name} | | no results.json (failed or not run; see --status) | | |")
            continue
        for metric, value in r.get("metrics", {}).items():
            if value is not None:
                lines.append(f"| {name} | {r['task']} | {metric} | {_fmt(value)} | {r.get('seconds', '')} |")
    plots = [("Headline metric per task", _metrics_plot(results, output_dir / "metrics.png"))]
    log = Path(checkpoint).parent / "log.jsonl" if checkpoint else None
    if log is not None and log.is_file():
        plots.append(("Pretraining curves", _curves_plot(log, output_dir / "curves.png")))
    for name, r in done.items():
        if r.get("task") == "davis":
            plots.append(("DAVIS: ground truth and predicted masks (mid-sequence frames)",
                          _overlays_plot(output_dir / name / "overlays", output_dir / "davis_overlays.png")))
        if r.get("task") == "knn":
            plots.append(("k-NN accuracy per class", _per_class_plot(r, output_dir / "per_class.png")))
    for title, path in plots:
        if path is not None:
            lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
