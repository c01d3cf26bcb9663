"""`richkd report`: compare the teachers, the fused targets and every student, in a table and in figures.

Students and the teacher come from `richkd evaluate` JSON files; CLIP's zero-shot classifier and the
fused targets come from a cache of the held-out split (`richkd precompute --split test --view-policy
center`), which also gives the alpha sweep. Evaluations made with `--corruptions` add a robustness table
and a figure of accuracy against corruption severity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from richkd.cache.reader import CacheReader
from richkd.pipeline.config import option, require
from richkd.pipeline.corruptions import CATEGORIES, CORRUPTIONS
from richkd.pipeline.errors import UserError
from richkd.pipeline.fusion import CLIP_SCALES
from richkd.pipeline.runtime import console
from richkd.stages.inspect_store import target_quality

COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE"),
           ("confident_correct", "confident-correct"), ("confidently_wrong", "confidently-wrong"))
TARGET_COLOUR, STUDENT_COLOUR = "#8c8c8c", "#1f77b4"


@dataclass
class ReportConfig:
    evals: str = option("evals", "Directory of `richkd evaluate --output` JSON files, one per run.", "Inputs")
    runs: list[str] = option([], "Runs to show, in order (file names without .json; default: all).", "Inputs")
    test_cache: str | None = option(
        None, "Cache of the held-out split, for the CLIP, fused-target and alpha-sweep rows.", "Inputs")
    alpha: float = option(0.7, "alpha of the fused-target row.", "Targets")
    clip_scale: str = option("raw", "CLIP scale of the fused-target row: raw, clip or a number.", "Targets")
    confidence_threshold: float = option(0.9, "Confidence of a confident prediction, for the target rows.",
                                         "Targets")
    out: str = option("report", "Directory for report.md, metrics.json and the figures.", "Output")

    def validate(self) -> None:
        require(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")


def load_evaluations(config: ReportConfig) -> dict[str, dict]:
    folder = Path(config.evals)
    names = config.runs or sorted(path.stem for path in folder.glob("*.json"))
    if not names:
        raise UserError(f"no evaluations in {folder}: run `richkd evaluate --output {folder}/NAME.json` first")
    evaluations = {}
    for name in names:
        path = folder / f"{name}.json"
        try:
            evaluations[name] = json.loads(path.read_text())
        except OSError as error:
            raise UserError(f"cannot read evaluation {path}: {error.strerror or error}") from error
        except json.JSONDecodeError as error:
            raise UserError(f"evaluation {path} is not valid JSON: {error}") from error
    return evaluations


def target_rows(config: ReportConfig) -> tuple[dict[str, dict], list[dict]]:
    """CLIP and fused-target rows and the alpha sweep, from the held-out cache."""
    reader = CacheReader(config.test_cache)
    reader.require_complete()
    quality = target_quality(reader, alpha=config.alpha, clip_scale=config.clip_scale,
                             confidence_threshold=config.confidence_threshold)
    clip = reader.attrs["clip"]
    rows = {
        f"CLIP zero-shot ({len(clip['templates'])} prompts)": quality["clip"],
        f"fused targets (alpha {config.alpha}, {config.clip_scale})": quality["fused"],
    }
    return rows, quality["alpha_sweep"]


def markdown_table(rows: dict[str, dict], targets: set[str]) -> str:
    lines = ["| run | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, metrics in rows.items():
        cells = [f"{metrics[key]:.3f}" if key == "nll" else f"{100 * metrics[key]:.2f}%" for key, _ in COLUMNS]
        lines.append(f"| {'*' + name + '*' if name in targets else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def new_figure(**options):
    """A matplotlib figure, imported here: matplotlib is slow to import and only the report draws."""
    from matplotlib.figure import Figure

    return Figure(**options)


def colours(rows: dict[str, dict], targets: set[str]) -> list[str]:
    return [TARGET_COLOUR if name in targets else STUDENT_COLOUR for name in rows]


def plot_accuracy(rows: dict[str, dict], targets: set[str], path: Path) -> None:
    names = list(rows)
    figure = new_figure(figsize=(7, 0.45 * len(names) + 1.2))
    axis = figure.subplots()
    values = [100 * rows[name]["top1"] for name in names]
    bars = axis.barh(names[::-1], values[::-1], color=colours(rows, targets)[::-1])
    axis.bar_label(bars, fmt="%.1f%%", padding=3)
    axis.set_xlabel("top-1 accuracy on the held-out split (%)")
    axis.set_xlim(0, max(*values, 1.0) * 1.15)  # room for the labels, even when every run scores 0%
    axis.set_title("accuracy (grey: targets, blue: students)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_reliability(rows: dict[str, dict], path: Path) -> None:
    names = [name for name in rows if "reliability" in rows[name]]
    columns = min(4, len(names))
    lines = -(-len(names) // columns)
    figure = new_figure(figsize=(3.2 * columns, 3.2 * lines))
    axes = figure.subplots(lines, columns, squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        bins = rows[name]["reliability"]
        width = 1 / len(bins["count"])
        filled = [(edge - width, accuracy, confidence) for edge, count, accuracy, confidence in
                  zip(bins["bin_upper_edges"], bins["count"], bins["accuracy"], bins["confidence"]) if count]
        lefts = [left for left, _, _ in filled]
        axis.bar(lefts, [accuracy for _, accuracy, _ in filled], width=width, align="edge", color=STUDENT_COLOUR,
                 edgecolor="white", label="accuracy")
        axis.bar(lefts, [abs(confidence - accuracy) for _, accuracy, confidence in filled],
                 bottom=[min(accuracy, confidence) for _, accuracy, confidence in filled], width=width,
                 align="edge", color="#d62728", alpha=0.35, label="gap to confidence")
        axis.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle="--")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_title(f"{name}\nECE {100 * rows[name]['ece']:.1f}%", fontsize=9)
        axis.set_xlabel("confidence", fontsize=8)
        axis.set_ylabel("accuracy", fontsize=8)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    figure.suptitle("reliability diagrams (15 bins)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_confidence(rows: dict[str, dict], targets: set[str], threshold: float, path: Path) -> None:
    """The paper's analysis: how often each run is confident and right, and confident and wrong."""
    names = list(rows)
    figure = new_figure(figsize=(10, 0.45 * len(names) + 1.4))
    axes = figure.subplots(1, 2, sharey=True)
    for axis, key, title in ((axes[0], "confident_correct", "confident and correct"),
                             (axes[1], "confidently_wrong", "confident and wrong")):
        values = [100 * rows[name][key] for name in names]
        bars = axis.barh(names[::-1], values[::-1], color=colours(rows, targets)[::-1])
        axis.bar_label(bars, fmt="%.1f%%", padding=3, fontsize=8)
        axis.set_xlim(0, max(max(values) * 1.25, 1.0))
        axis.set_title(f"{title} (% of samples)", fontsize=10)
    figure.suptitle(f"predictions with confidence >= {threshold}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_alpha_sweep(sweep: list[dict], path: Path) -> None:
    figure = new_figure(figsize=(12, 3.6))
    axes = figure.subplots(1, 3)
    for axis, (key, label) in zip(axes, (("top1", "top-1 (%)"), ("nll", "NLL"), ("ece", "ECE (%)"))):
        for scale in CLIP_SCALES:
            points = [row for row in sweep if row["clip_scale"] == scale]
            factor = 1 if key == "nll" else 100
            axis.plot([row["alpha"] for row in points], [factor * row[key] for row in points], marker="o",
                      label=f"CLIP scale {scale}")
        axis.set_xlabel("alpha (1 = teacher only, 0 = CLIP only)")
        axis.set_title(f"fused targets: {label}")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def describe_robustness(robustness: dict) -> str:
    source = robustness["source"]
    if robustness["source"] == "generated":
        source = f"made here with the {robustness['parameters']} parameters, seed {robustness['seed']}"
    severities = ", ".join(str(s) for s in robustness["severities"])
    return f"{source}; severities {severities}; {robustness['samples']} images"


def robustness_table(robustness: dict[str, dict]) -> str:
    """Runs as columns: clean top-1, mean corruption accuracy, relative drop, then each corruption's mean."""
    names = list(robustness)
    corruptions = [c for c in CORRUPTIONS if any(c in r["corruption_mean_top1"] for r in robustness.values())]
    lines = ["| top-1 | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    rows = [("clean", [r["clean_top1"] for r in robustness.values()]),
            ("**mean corruption accuracy**", [r["mean_corruption_accuracy"] for r in robustness.values()]),
            ("relative drop", [r["relative_drop"] for r in robustness.values()])]
    rows += [(name, [r["corruption_mean_top1"].get(name) for r in robustness.values()]) for name in corruptions]
    for label, values in rows:
        cells = [f"**{percent(v)}**" if label.startswith("**") else percent(v) for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def robustness_section(robustness: dict[str, dict]) -> str:
    settings = sorted({describe_robustness(r) for r in robustness.values()})
    return "\n\n".join([
        "## Robustness",
        "Top-1 under the common corruptions of CIFAR-10-C / ImageNet-C (" + "; ".join(settings) + "). The mean "
        "corruption accuracy is the mean over every corruption x severity cell, the relative drop is (clean - "
        "mean corruption accuracy) / clean, and each corruption's row is its mean over the severities.",
        robustness_table(robustness),
    ])


def severity_curve(robustness: dict, corruptions: list[str]) -> tuple[list[int], list[float]]:
    """Severity 0 (clean), then each severity's mean top-1 over `corruptions`."""
    cells = robustness["cells"]
    means = [sum(cells[name][str(s)]["top1"] for name in corruptions) / len(corruptions)
             for s in robustness["severities"]]
    return [0, *robustness["severities"]], [robustness["clean_top1"], *means]


def plot_robustness(robustness: dict[str, dict], targets: set[str], path: Path) -> None:
    """Accuracy against severity, one line per run: the mean over all corruptions large, each category's small."""
    evaluated = [c for c in CORRUPTIONS if any(c in r["cells"] for r in robustness.values())]
    categories = {category: [c for c in members if c in evaluated] for category, members in CATEGORIES.items()}
    categories = {category: members for category, members in categories.items() if members}
    figure = new_figure(figsize=(12, 5.6))
    grid = figure.add_gridspec(2, 4)
    main = figure.add_subplot(grid[:, :2])
    small = [figure.add_subplot(grid[i // 2, 2 + i % 2], sharey=main) for i in range(len(categories))]
    palette = iter(["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"] * 4)
    styles = {name: {"color": TARGET_COLOUR, "linestyle": "--"} if name in targets else {"color": next(palette)}
              for name in robustness}
    panels = [(main, f"mean over all {len(evaluated)} corruptions", evaluated)]
    panels += [(axis, f"{category}\n{', '.join(name.split('_')[0] for name in members)}", members)
               for axis, (category, members) in zip(small, categories.items())]
    for axis, title, members in panels:
        for name, result in robustness.items():
            present = [c for c in members if c in result["cells"]]
            if present:
                x, y = severity_curve(result, present)
                axis.plot(x, [100 * v for v in y], marker="o", markersize=4 if axis is main else 3, label=name,
                          linewidth=1.8 if axis is main else 1.2, **styles[name])
        axis.set_title(title, fontsize=11 if axis is main else 8)
        axis.set_xticks(range(0, 6))
        axis.tick_params(labelsize=8 if axis is main else 7)
        axis.grid(alpha=0.3)
    main.set_xlabel("severity (0 = clean)")
    main.set_ylabel("top-1 accuracy (%)")
    main.legend(fontsize=8, loc="upper right")
    figure.suptitle("accuracy under common corruptions (grey dashed: targets)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def run(config: ReportConfig) -> dict:
    evaluations = load_evaluations(config)
    rows: dict[str, dict] = {}
    targets: set[str] = set()
    sweep: list[dict] = []
    if "teacher" in evaluations:
        rows["teacher"] = evaluations.pop("teacher")
        targets.add("teacher")
    if config.test_cache:
        cache_rows, sweep = target_rows(config)
        rows.update(cache_rows)
        targets.update(cache_rows)
    rows.update(evaluations)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"accuracy": "accuracy.png", "reliability": "reliability.png", "confidence": "confidence.png"}
    plot_accuracy(rows, targets, out / figures["accuracy"])
    plot_reliability(rows, out / figures["reliability"])
    plot_confidence(rows, targets, config.confidence_threshold, out / figures["confidence"])
    if sweep:
        figures["alpha sweep"] = "alpha_sweep.png"
        plot_alpha_sweep(sweep, out / figures["alpha sweep"])
    sections = [
        "# RichKD report",
        f"Held-out split; *italic* rows are targets, the rest students. Confident: probability >= "
        f"{config.confidence_threshold}; confident-correct and confidently-wrong are shares of all samples.",
        markdown_table(rows, targets),
        *(f"![{name}]({file})" for name, file in figures.items()),
    ]
    robustness = {name: metrics["robustness"] for name, metrics in rows.items() if "robustness" in metrics}
    if robustness:
        plot_robustness(robustness, targets, out / "robustness.png")
        sections += [robustness_section(robustness), "![robustness](robustness.png)"]
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    summary = {name: {key: metrics[key] for key, _ in COLUMNS} for name, metrics in rows.items()}
    for name, result in robustness.items():
        summary[name].update({key: result[key] for key in ("mean_corruption_accuracy", "relative_drop")})
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    console.print(f"report written to {out / 'report.md'}")
    return summary
