"""`richkd report`: compare the teachers, the fused targets and every student, in a table and in figures.

Students and the teacher come from `richkd evaluate` JSON files; CLIP's zero-shot classifier and the
fused targets come from a cache of the held-out split (`richkd precompute --split test --view-policy
center`), which also gives the alpha sweep. Evaluations made with `--corruptions` add a robustness table
and a figure of accuracy against corruption severity.

An evaluation file is one run: one seed, or several (`richkd evaluate` over a glob of checkpoints writes them
under "seeds"). Each metric is shown as the mean over seeds with its Student-t 95% interval, and each student is
compared with the baselines seed by seed: same seed, same initialisation and data order, so the per-seed
difference cancels what the seeds share.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from richkd.cache.reader import CacheReader
from richkd.pipeline.config import option, require
from richkd.pipeline.corruptions import CATEGORIES, CORRUPTIONS
from richkd.pipeline.errors import UserError
from richkd.pipeline.fusion import CLIP_SCALES, DEFAULT_ALPHA
from richkd.pipeline.metrics import CONFIDENCE_THRESHOLD, percent
from richkd.pipeline.runtime import console, print_json
from richkd.pipeline.targets import target_quality

COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE"),
           ("confident_correct", "confident-correct"), ("confidently_wrong", "confidently-wrong"))
ROBUSTNESS_METRICS = ("mean_corruption_accuracy", "relative_drop")
METRICS = (*(key for key, _ in COLUMNS), *ROBUSTNESS_METRICS)
# The paired-differences table's columns, those a run has.
PAIRED_COLUMNS = (("top1", "top-1"), ("nll", "NLL"), ("ece", "ECE"),
                  ("mean_corruption_accuracy", "mean corruption accuracy"))
PAIR_SEPARATOR = "-vs-"
TARGET_COLOUR, STUDENT_COLOUR = "#8c8c8c", "#1f77b4"


@dataclass
class ReportConfig:
    evals: str = option("evals", "Directory of `richkd evaluate --output` JSON files, one per run.", "Inputs")
    runs: list[str] = option([], "Runs to show, in order (file names without .json; default: all).", "Inputs")
    test_cache: str | None = option(
        None, "Cache of the held-out split, for the CLIP, fused-target and alpha-sweep rows.", "Inputs")
    alpha: float = option(DEFAULT_ALPHA, "alpha of the fused-target row.", "Targets")
    clip_scale: str = option("raw", "CLIP scale of the fused-target row: raw, clip or a number.", "Targets")
    confidence_threshold: float = option(
        CONFIDENCE_THRESHOLD, "Confidence of a confident prediction, for the target rows.", "Targets")
    baselines: list[str] = option(
        ["kd", "teacher_shrink"], "Runs every student is compared with, seed by seed (those not in the report are "
        "skipped).", "Comparisons")
    pairs: list[str] = option(
        [], "More paired comparisons, each X-vs-B (e.g. ce_long-vs-ce): run X minus run B, seed by seed.",
        "Comparisons")
    out: str = option("report", "Directory for report.md, metrics.json and the figures.", "Output")
    json: bool = option(False, "Print the runs' and paired differences' means and intervals as JSON (what "
                        "metrics.json holds) instead of saying where the report is.", "Output")

    def validate(self) -> None:
        require(0 <= self.alpha <= 1, f"--alpha must be in [0, 1], got {self.alpha}")


def load_evaluations(config: ReportConfig) -> dict[str, list[dict]]:
    """Each run's evaluations, one per seed."""
    folder = Path(config.evals)
    names = config.runs or sorted(path.stem for path in folder.glob("*.json"))
    if not names:
        raise UserError(f"no evaluations in {folder}: run `richkd evaluate --output {folder}/NAME.json` first")
    evaluations = {}
    for name in names:
        path = folder / f"{name}.json"
        try:
            evaluation = json.loads(path.read_text())
        except OSError as error:
            raise UserError(f"cannot read evaluation {path}: {error.strerror or error}") from error
        except json.JSONDecodeError as error:
            raise UserError(f"evaluation {path} is not valid JSON: {error}") from error
        evaluations[name] = evaluation.get("seeds", [evaluation])
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


def estimate(values: list[float]) -> dict:
    """The mean over seeds and its Student-t 95% interval, mean +- t(0.975, n - 1) sd / sqrt(n) (None for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n_seeds": len(values)}
    from scipy.stats import t  # imported here: scipy is slow to import, and only intervals need it

    half_width = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half_width, mean + half_width], "n_seeds": len(values)}


def seed_metrics(result: dict) -> dict[str, float | None]:
    """One seed's value of each metric the report compares, the robustness ones when they were measured."""
    metrics = {key: result[key] for key, _ in COLUMNS}
    if "robustness" in result:
        metrics.update({key: result["robustness"][key] for key in ROBUSTNESS_METRICS})
    return metrics


def run_estimates(results: list[dict]) -> dict[str, dict]:
    """Each metric's estimate over a run's seeds; a relative drop is None, and left out, when clean top-1 is 0."""
    per_seed = [seed_metrics(result) for result in results]
    return {key: estimate(values) for key in METRICS
            if (values := [metrics[key] for metrics in per_seed if metrics.get(key) is not None])}


def describe_seeds(seeds: Iterable[int | None]) -> str:
    recorded = sorted(seed for seed in seeds if seed is not None)
    return "seeds " + ", ".join(map(str, recorded)) if recorded else "no recorded seed"


def paired_estimates(runs: dict[str, list[dict]], name: str, baseline: str) -> dict[str, dict]:
    """Each metric's estimate of run `name` minus run `baseline`, seed by seed over the seeds both have."""
    by_seed = {run: {result.get("seed"): seed_metrics(result) for result in runs[run]} for run in (name, baseline)}
    seeds = sorted(seed for seed in by_seed[name].keys() & by_seed[baseline].keys() if seed is not None)
    if not seeds:
        run_seeds, baseline_seeds = describe_seeds(by_seed[name]), describe_seeds(by_seed[baseline])
        raise UserError(f"runs {name} ({run_seeds}) and {baseline} ({baseline_seeds}) share no seed: a paired "
                        "difference needs the same seeds")
    estimates = {}
    for key in METRICS:
        seed_values = [(by_seed[name][seed].get(key), by_seed[baseline][seed].get(key)) for seed in seeds]
        differences = [value - base for value, base in seed_values if value is not None and base is not None]
        if differences:
            estimates[key] = estimate(differences)
    return estimates


def pair_name(name: str, baseline: str) -> str:
    return f"{name}{PAIR_SEPARATOR}{baseline}"


def comparisons(config: ReportConfig, runs: dict[str, list[dict]], targets: set[str]) -> list[tuple[str, str]]:
    """(run, baseline) of each paired difference: every student against every baseline in the report, then
    --pairs."""
    students = [name for name in runs if name not in targets]
    pairs = [(name, baseline) for name in students for baseline in config.baselines
             if baseline in runs and baseline != name]
    pairs = [pair for i, pair in enumerate(pairs) if pair[::-1] not in pairs[:i]]  # kd-vs-x says what x-vs-kd says
    for entry in config.pairs:
        pair = tuple(entry.split(PAIR_SEPARATOR))
        if len(pair) != 2 or not all(name in runs for name in pair):
            raise UserError(f"--pairs entry '{entry}' must be X-vs-B with X and B runs of the report: "
                            f"{', '.join(runs)}")
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def metric_unit(key: str) -> tuple[int, int, str]:
    """(scale, decimals, suffix) of a metric in the report: NLL as a number, the rest as percentages."""
    return (1, 3, "") if key == "nll" else (100, 1, "%")


def estimate_text(key: str, value: dict | None) -> str:
    """The mean and the 95% interval's half-width, `81.8 ± 1.2%`; the value alone for one seed."""
    if value is None:
        return "-"
    scale, decimals, suffix = metric_unit(key)
    text = f"{scale * value['mean']:.{decimals}f}"
    if value["ci95"] is not None:
        low, high = value["ci95"]
        text += f" ± {scale * (high - low) / 2:.{decimals}f}"
    return text + suffix


def difference_text(key: str, value: dict | None) -> str:
    """The mean difference and its 95% interval, `+2.1 [+0.5, +3.7]%`, in bold when the interval excludes 0 (which
    a bound rounded to 0.0 would hide); the difference alone for one seed."""
    if value is None:
        return "-"
    scale, decimals, suffix = metric_unit(key)
    text = f"{scale * value['mean']:+.{decimals}f}"
    if value["ci95"] is None:
        return text + suffix
    low, high = value["ci95"]
    text += f" [{scale * low:+.{decimals}f}, {scale * high:+.{decimals}f}]{suffix}"
    return f"**{text}**" if low > 0 or high < 0 else text


def markdown_table(estimates: dict[str, dict], targets: set[str]) -> str:
    lines = ["| run | " + " | ".join(label for _, label in COLUMNS) + " | n |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, metrics in estimates.items():
        cells = [estimate_text(key, metrics[key]) for key, _ in COLUMNS]
        lines.append(f"| {'*' + name + '*' if name in targets else name} | " + " | ".join(cells)
                     + f" | {metrics['top1']['n_seeds']} |")
    return "\n".join(lines)


def paired_section(pairs: list[tuple[str, str]], paired: dict[str, dict]) -> str:
    columns = [(key, label) for key, label in PAIRED_COLUMNS if any(key in metrics for metrics in paired.values())]
    lines = ["| run vs baseline | n | " + " | ".join(label for _, label in columns) + " |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for name, baseline in pairs:
        metrics = paired[pair_name(name, baseline)]
        cells = [difference_text(key, metrics.get(key)) for key, _ in columns]
        lines.append(f"| {name} vs {baseline} | {metrics['top1']['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n\n".join([
        "## Paired differences",
        "Run minus baseline, seed by seed over the seeds both have (the same seed: the same initialisation and data "
        "order): the mean difference and, in brackets, its Student-t 95% interval over seeds (n-1 degrees of "
        "freedom) of the per-seed difference; an interval that excludes 0 is a difference at the 5% level, "
        "shown in bold. Lower NLL and ECE are better.",
        "\n".join(lines),
    ])


def new_figure(**options):
    """A matplotlib figure, imported here: matplotlib is slow to import and only the report draws."""
    from matplotlib.figure import Figure

    return Figure(**options)


def colours(rows: dict[str, dict], targets: set[str]) -> list[str]:
    return [TARGET_COLOUR if name in targets else STUDENT_COLOUR for name in rows]


def plot_accuracy(estimates: dict[str, dict], targets: set[str], path: Path) -> None:
    """Mean top-1 of each run, with its 95% interval over seeds as an error bar."""
    names = list(estimates)
    figure = new_figure(figsize=(7, 0.45 * len(names) + 1.2))
    axis = figure.subplots()
    top1 = [estimates[name]["top1"] for name in names]
    values = [100 * value["mean"] for value in top1]
    # no error bar where there is no interval (NaN draws none)
    errors = [math.nan if value["ci95"] is None else 50 * (value["ci95"][1] - value["ci95"][0]) for value in top1]
    highs = [100 * value["mean"] if value["ci95"] is None else 100 * value["ci95"][1] for value in top1]
    bars = axis.barh(names[::-1], values[::-1], xerr=errors[::-1], capsize=3, color=colours(estimates, targets)[::-1])
    axis.bar_label(bars, fmt="%.1f%%", padding=3)
    axis.set_xlabel("top-1 on the held-out split (%): mean over seeds, 95% interval")
    axis.set_xlim(0, max(*highs, 1.0) * 1.15)  # room for the labels, even when every run scores 0%
    axis.set_title("accuracy (grey: targets, blue: students)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def pooled_reliability(results: list[dict]) -> dict:
    """The reliability bins of every seed's predictions together: counts added, accuracy and confidence weighted
    by count."""
    bins = [result["reliability"] for result in results]
    counts = [sum(seed_counts) for seed_counts in zip(*(seed["count"] for seed in bins))]

    def pooled(key: str) -> list[float | None]:
        return [sum(seed[key][i] * seed["count"][i] for seed in bins if seed["count"][i]) / count if count else None
                for i, count in enumerate(counts)]

    return {"bin_upper_edges": bins[0]["bin_upper_edges"], "count": counts, "accuracy": pooled("accuracy"),
            "confidence": pooled("confidence")}


def plot_reliability(runs: dict[str, list[dict]], estimates: dict[str, dict], path: Path) -> None:
    """One diagram per run; every result of `runs` has its reliability bins."""
    names = list(runs)
    columns = min(4, len(names))
    lines = -(-len(names) // columns)
    figure = new_figure(figsize=(3.2 * columns, 3.2 * lines))
    axes = figure.subplots(lines, columns, squeeze=False)
    for axis in axes.flat[len(names):]:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        bins = pooled_reliability(runs[name])
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
        axis.set_title(f"{name}\nECE {100 * estimates[name]['ece']['mean']:.1f}%", fontsize=9)
        axis.set_xlabel("confidence", fontsize=8)
        axis.set_ylabel("accuracy", fontsize=8)
    axes.flat[0].legend(fontsize=7, loc="upper left")
    figure.suptitle("reliability diagrams (15 bins, every seed's predictions together)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_confidence(estimates: dict[str, dict], targets: set[str], threshold: float, path: Path) -> None:
    """The paper's analysis: how often each run is confident and right, and confident and wrong (means over
    seeds)."""
    names = list(estimates)
    figure = new_figure(figsize=(10, 0.45 * len(names) + 1.4))
    axes = figure.subplots(1, 2, sharey=True)
    for axis, key, title in ((axes[0], "confident_correct", "confident and correct"),
                             (axes[1], "confidently_wrong", "confident and wrong")):
        values = [100 * estimates[name][key]["mean"] for name in names]
        bars = axis.barh(names[::-1], values[::-1], color=colours(estimates, targets)[::-1])
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




def describe_robustness(robustness: dict) -> str:
    source = robustness["source"]
    if robustness["source"] == "generated":
        source = f"made here with the {robustness['parameters']} parameters, seed {robustness['seed']}"
    severities = ", ".join(str(s) for s in robustness["severities"])
    return f"{source}; severities {severities}; {robustness['samples']} images"


def mean_or_none(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def robustness_table(robustness: dict[str, list[dict]], estimates: dict[str, dict]) -> str:
    """Runs as columns: clean top-1, mean corruption accuracy, relative drop, then each corruption's mean; means
    over seeds, the mean corruption accuracy and relative drop with their intervals."""
    names = list(robustness)
    corruptions = [c for c in CORRUPTIONS
                   if any(c in seed["corruption_mean_top1"] for seeds in robustness.values() for seed in seeds)]
    lines = ["| top-1 | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    rows = [("clean", [percent(statistics.fmean(seed["clean_top1"] for seed in seeds))
                       for seeds in robustness.values()]),
            ("**mean corruption accuracy**",
             [f"**{estimate_text('mean_corruption_accuracy', estimates[name]['mean_corruption_accuracy'])}**"
              for name in names]),
            ("relative drop", [estimate_text("relative_drop", estimates[name].get("relative_drop")) for name in names])]
    rows += [(corruption, [percent(mean_or_none([seed["corruption_mean_top1"].get(corruption) for seed in seeds]))
                           for seeds in robustness.values()]) for corruption in corruptions]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def robustness_section(robustness: dict[str, list[dict]], estimates: dict[str, dict]) -> str:
    settings = sorted({describe_robustness(seed) for seeds in robustness.values() for seed in seeds})
    return "\n\n".join([
        "## Robustness",
        "Top-1 under the common corruptions of CIFAR-10-C / ImageNet-C (" + "; ".join(settings) + "). The mean "
        "corruption accuracy is the mean over every corruption x severity cell, the relative drop is (clean - "
        "mean corruption accuracy) / clean, and each corruption's row is its mean over the severities. Every cell "
        "is a mean over seeds; the mean corruption accuracy and relative drop come with ± the half-width of their "
        "95% interval.",
        robustness_table(robustness, estimates),
    ])


def severity_curve(seeds: list[dict], corruptions: list[str]) -> tuple[list[int], list[float]]:
    """Severity 0 (clean), then each severity's mean top-1 over `corruptions`, each a mean over seeds."""
    severities = seeds[0]["severities"]
    curves = [[seed["clean_top1"], *(sum(seed["cells"][name][str(s)]["top1"] for name in corruptions) / len(corruptions)
                                     for s in severities)] for seed in seeds]
    return [0, *severities], [statistics.fmean(points) for points in zip(*curves)]


def plot_robustness(robustness: dict[str, list[dict]], targets: set[str], path: Path) -> None:
    """Accuracy against severity, one line per run (means over seeds): the mean over all corruptions large, each
    category's small."""
    evaluated = [c for c in CORRUPTIONS if any(c in seed["cells"] for seeds in robustness.values() for seed in seeds)]
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
        for name, seeds in robustness.items():
            present = [c for c in members if all(c in seed["cells"] for seed in seeds)]
            if present:
                x, y = severity_curve(seeds, present)
                axis.plot(x, [100 * v for v in y], marker="o", markersize=4 if axis is main else 3, label=name,
                          linewidth=1.8 if axis is main else 1.2, **styles[name])
        axis.set_title(title, fontsize=11 if axis is main else 8)
        axis.set_xticks(range(0, 6))
        axis.tick_params(labelsize=8 if axis is main else 7)
        axis.grid(alpha=0.3)
    main.set_xlabel("severity (0 = clean)")
    main.set_ylabel("top-1 accuracy (%)")
    main.legend(fontsize=8, loc="upper right")
    figure.suptitle("accuracy under common corruptions (means over seeds; grey dashed: targets)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def run(config: ReportConfig) -> dict:
    evaluations = load_evaluations(config)
    runs: dict[str, list[dict]] = {}
    targets: set[str] = set()
    sweep: list[dict] = []
    if "teacher" in evaluations:
        runs["teacher"] = evaluations.pop("teacher")
        targets.add("teacher")
    if config.test_cache:
        cache_rows, sweep = target_rows(config)
        runs.update({name: [metrics] for name, metrics in cache_rows.items()})
        targets.update(cache_rows)
    runs.update(evaluations)
    pairs = comparisons(config, runs, targets)
    estimates = {name: run_estimates(results) for name, results in runs.items()}
    paired = {pair_name(name, baseline): paired_estimates(runs, name, baseline) for name, baseline in pairs}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"accuracy": "accuracy.png"}
    plot_accuracy(estimates, targets, out / figures["accuracy"])
    binned = {name: results for name, results in runs.items() if all("reliability" in result for result in results)}
    if binned:  # evaluations written by hand may have no bins
        figures["reliability"] = "reliability.png"
        plot_reliability(binned, estimates, out / figures["reliability"])
    figures["confidence"] = "confidence.png"
    plot_confidence(estimates, targets, config.confidence_threshold, out / figures["confidence"])
    if sweep:
        figures["alpha sweep"] = "alpha_sweep.png"
        plot_alpha_sweep(sweep, out / figures["alpha sweep"])
    sections = [
        "# RichKD report",
        f"Held-out split; *italic* rows are targets, the rest students. Each cell is the mean over the run's n seeds "
        f"± the half-width of its Student-t 95% interval (the value alone for one seed). Confident: probability >= "
        f"{config.confidence_threshold}; confident-correct and confidently-wrong are shares of all samples.",
        markdown_table(estimates, targets),
    ]
    if paired:
        sections.append(paired_section(pairs, paired))
    sections += [f"![{name}]({file})" for name, file in figures.items()]
    robustness = {name: [result["robustness"] for result in results if "robustness" in result]
                  for name, results in runs.items() if any("robustness" in result for result in results)}
    if robustness:
        plot_robustness(robustness, targets, out / "robustness.png")
        sections += [robustness_section(robustness, estimates), "![robustness](robustness.png)"]
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    summary = {"runs": estimates, "paired": paired}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    if config.json:
        print_json(summary)
    else:
        console.print(f"report written to {out / 'report.md'}")
    return summary
