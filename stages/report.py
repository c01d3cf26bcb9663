"""`richkd report`: compare the teachers, the fused targets and every student, in tables and figures, split by split.

Students and the teacher come from `richkd evaluate` JSON files, each placed in the tables of the split it records
(`--evals evals/test --evals evals/shifted`: one folder a split); CLIP's zero-shot classifier and the fused targets
come from a cache of each held-out split (`richkd precompute --split S --view-policy center`), which also gives the
alpha sweep and how the teacher's and CLIP's errors overlap. Evaluations made with `--corruptions` add a robustness
table and a figure of accuracy against corruption severity.

An evaluation file is one run: one seed, or several (`richkd evaluate` over a glob of checkpoints writes them
under "seeds"). Each metric is shown as the mean over seeds with its Student-t 95% interval, and each student is
compared with the baselines seed by seed: same seed, same initialisation and data order, so the per-seed
difference cancels what the seeds share. A baseline may be named by the student's own settings (`shrink_{alpha}`:
the teacher-shrink control of the student's alpha), and a figure shows every paired difference with its interval.

With `--shifted-split` and `--label-only`, the report checks the preconditions of RichKD's regime on the targets
(docs/study.md): a teacher that knows more than the label-only student, a CLIP about as good in distribution and
better under shift, and fused targets better than both under shift.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from richkd.cache.reader import CacheReader
from richkd.pipeline.corruptions import CATEGORIES, CORRUPTIONS
from richkd.pipeline.errors import UserError, read_json
from richkd.pipeline.metrics import percent, read_superclasses
from richkd.pipeline.runtime import console, print_json
from richkd.pipeline.targets import (
    STANDARDIZED,
    SWEEP_FUSIONS,
    best_weightings,
    describe_overlap,
    target_quality,
)
from richkd.pipeline.variants import CLIP, TEACHER, describe_weights
from richkd.stages.options import ReportConfig

COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE"),
           ("confident_correct", "confident-correct"), ("confidently_wrong", "confidently-wrong"),
           ("superclass_share", "superclass share"))
ROBUSTNESS_METRICS = ("mean_corruption_accuracy", "relative_drop")
METRICS = (*(key for key, _ in COLUMNS), *ROBUSTNESS_METRICS)
# The paired-differences table's and figure's columns, those a run has: each of the paper's claims.
PAIRED_COLUMNS = (("top1", "top-1"), ("nll", "NLL"), ("ece", "ECE"), ("confident_correct", "confident-correct"),
                  ("confidently_wrong", "confidently-wrong"), ("superclass_share", "superclass share"),
                  ("mean_corruption_accuracy", "mean corruption accuracy"))
LOWER_IS_BETTER = {"nll", "ece", "confidently_wrong", "relative_drop"}
PAIR_SEPARATOR = "-vs-"
TARGET_COLOUR, STUDENT_COLOUR = "#8c8c8c", "#1f77b4"
BETTER_COLOUR, WORSE_COLOUR = "#2ca02c", "#d62728"
# The split of an evaluation that records none (written by hand or by another tool).
DEFAULT_SPLIT = "test"


def evaluation_split(path: Path, results: list[dict]) -> str:
    """The split an evaluation file's results record (DEFAULT_SPLIT for none), the same for every seed."""
    splits = {result.get("split", DEFAULT_SPLIT) for result in results}
    if len(splits) > 1:
        raise UserError(f"evaluation {path} holds results of several splits ({', '.join(sorted(splits))}): "
                        "write one file a split")
    return splits.pop()


def load_evaluations(config: ReportConfig) -> dict[str, dict[str, list[dict]]]:
    """Each split's runs, each run's evaluations one per seed, from every folder of --evals."""
    by_split: dict[str, dict[str, list[dict]]] = {}
    found_from: dict[tuple[str, str], Path] = {}
    for folder in map(Path, config.evals):
        names = config.runs or sorted(path.stem for path in folder.glob("*.json"))
        for name in names:
            path = folder / f"{name}.json"
            if config.runs and not path.exists() and len(config.evals) > 1:
                continue  # a run need not be evaluated on every split
            evaluation = read_json(path, "evaluation")
            results = evaluation.get("seeds", [evaluation])
            split = evaluation_split(path, results)
            if (split, name) in found_from:
                raise UserError(f"run {name} has two evaluations of split {split}: {found_from[split, name]} and "
                                f"{path}")
            found_from[split, name] = path
            by_split.setdefault(split, {})[name] = results
    folders = ", ".join(config.evals)
    missing = [name for name in config.runs if not any(name in runs for runs in by_split.values())]
    if missing:
        raise UserError(f"no evaluation of {', '.join(missing)} in {folders}")
    if not by_split:
        raise UserError(f"no evaluations in {folders}: run `richkd evaluate --output {config.evals[0]}/NAME.json` "
                        "first")
    return by_split


def open_test_caches(config: ReportConfig) -> dict[str, CacheReader]:
    """Each held-out cache by the split it was precomputed from."""
    caches = {}
    for url in config.test_cache:
        reader = CacheReader(url)
        reader.require_complete()
        split = reader.attrs["dataset"]["split"]
        if split in caches:
            raise UserError(f"caches {caches[split].url} and {url} are both of split {split}: give one a split")
        caches[split] = reader
    return caches


def fused_row_name(config: ReportConfig) -> str:
    weights = f"alpha {config.alpha}" if config.fuse is None else describe_weights(config.fuse_weights)
    return f"fused targets ({weights}, {STANDARDIZED if config.standardize else config.clip_scale})"


def source_row_name(reader: CacheReader, name: str) -> str:
    """A cached source's row: `CLIP zero-shot (12 prompts)`, `clip_b16 zero-shot (12 prompts)`, `teacher2 (cached)`."""
    if reader.sources[name].kind != "clip":
        return f"{name} (cached)"
    return f"{'CLIP' if name == CLIP else name} zero-shot ({len(reader.source_records[name]['templates'])} prompts)"


def target_rows(config: ReportConfig, reader: CacheReader) -> tuple[dict[str, dict], dict]:
    """A row for each cached source but the teacher (whose evaluation is its row) and the fused-target row, from a
    held-out cache, and everything measured on its targets."""
    class_names = reader.attrs["dataset"]["class_names"]
    superclasses = read_superclasses(config.superclasses, class_names) if config.superclasses else None
    quality = target_quality(reader, alpha=config.alpha, clip_scale=config.clip_scale,
                             standardized=config.standardize, confidence_threshold=config.confidence_threshold,
                             superclasses=superclasses, fuse=config.fuse_weights)
    rows = {source_row_name(reader, name): metrics for name, metrics in quality["sources"].items() if name != TEACHER}
    rows[fused_row_name(config)] = quality["fused"]
    return rows, quality


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
    metrics = {key: result.get(key) for key, _ in COLUMNS}
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


def baseline_of(template: str, results: list[dict]) -> str | None:
    """A baseline's name, its {setting} fields filled from a run's recorded training settings; None when the run
    records no such setting (a run of another tool, or a teacher)."""
    try:
        return template.format(**results[0].get("training", {}))
    except (KeyError, IndexError, ValueError):
        return None


def comparisons(config: ReportConfig, runs: dict[str, list[dict]], targets: set[str]) -> list[tuple[str, str]]:
    """(run, baseline) of each paired difference: every student against every baseline in the report, then
    --pairs."""
    students = [name for name in runs if name not in targets]
    pairs = [(name, baseline) for name in students for template in config.baselines
             if (baseline := baseline_of(template, runs[name])) in runs and baseline != name]
    pairs = list(dict.fromkeys(pairs))  # two templates may name the same baseline
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


def present_columns(columns: tuple[tuple[str, str], ...], rows: Iterable[dict]) -> list[tuple[str, str]]:
    """The columns that some row has a value of."""
    rows = list(rows)
    return [(key, label) for key, label in columns if any(key in row for row in rows)]


def markdown_table(estimates: dict[str, dict], targets: set[str]) -> str:
    columns = present_columns(COLUMNS, estimates.values())
    lines = ["| run | " + " | ".join(label for _, label in columns) + " | n |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for name, metrics in estimates.items():
        cells = [estimate_text(key, metrics.get(key)) for key, _ in columns]
        lines.append(f"| {'*' + name + '*' if name in targets else name} | " + " | ".join(cells)
                     + f" | {metrics['top1']['n_seeds']} |")
    return "\n".join(lines)


def paired_section(pairs: list[tuple[str, str]], paired: dict[str, dict], heading: str) -> str:
    columns = present_columns(PAIRED_COLUMNS, paired.values())
    lines = ["| run vs baseline | n | " + " | ".join(label for _, label in columns) + " |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for name, baseline in pairs:
        metrics = paired[pair_name(name, baseline)]
        cells = [difference_text(key, metrics.get(key)) for key, _ in columns]
        lines.append(f"| {name} vs {baseline} | {metrics['top1']['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n\n".join([
        f"{heading} Paired differences",
        "Run minus baseline, seed by seed over the seeds both have (the same seed: the same initialisation and data "
        "order): the mean difference and, in brackets, its Student-t 95% interval over seeds (n-1 degrees of "
        "freedom) of the per-seed difference; an interval that excludes 0 is a difference at the 5% level, "
        "shown in bold. Lower NLL, ECE and confidently-wrong are better.",
        "\n".join(lines),
    ])


def new_figure(**options):
    """A matplotlib figure, imported here: matplotlib is slow to import and only the report draws."""
    from matplotlib.figure import Figure

    return Figure(**options)


def colours(rows: dict[str, dict], targets: set[str]) -> list[str]:
    return [TARGET_COLOUR if name in targets else STUDENT_COLOUR for name in rows]


def plot_accuracy(estimates: dict[str, dict], targets: set[str], split: str, path: Path) -> None:
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
    axis.set_xlabel(f"top-1 on {split} (%): mean over seeds, 95% interval")
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


def plot_alpha_sweep(sweep: list[dict], split: str, path: Path) -> None:
    figure = new_figure(figsize=(12, 3.6))
    axes = figure.subplots(1, 3)
    for axis, (key, label) in zip(axes, (("top1", "top-1 (%)"), ("nll", "NLL"), ("ece", "ECE (%)"))):
        for scale in SWEEP_FUSIONS:
            points = [row for row in sweep if row["clip_scale"] == scale]
            factor = 1 if key == "nll" else 100
            axis.plot([row["alpha"] for row in points], [factor * row[key] for row in points], marker="o",
                      label=scale if scale == STANDARDIZED else f"CLIP scale {scale}")
        axis.set_xlabel("alpha (1 = teacher only, 0 = CLIP only)")
        axis.set_title(f"fused targets on {split}: {label}")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_paired_differences(pairs: list[tuple[str, str]], paired: dict[str, dict], split: str, path: Path) -> None:
    """Every paired difference with its 95% interval, a panel a metric: green where the interval shows the run
    better than its baseline, red where worse, grey where it includes 0."""
    columns = present_columns(PAIRED_COLUMNS, paired.values())
    figure = new_figure(figsize=(2.6 * len(columns) + 2.5, 0.3 * len(pairs) + 1.6))
    axes = figure.subplots(1, len(columns), sharey=True, squeeze=False)[0]
    labels = [f"{name} vs {baseline}" for name, baseline in pairs]
    for axis, (key, label) in zip(axes, columns):
        scale = metric_unit(key)[0]
        for row, (name, baseline) in enumerate(pairs):
            value = paired[pair_name(name, baseline)].get(key)
            if value is None:
                continue
            mean, interval = scale * value["mean"], value["ci95"]
            colour = TARGET_COLOUR
            if interval is not None and (interval[0] > 0 or interval[1] < 0):
                colour = BETTER_COLOUR if (mean < 0) == (key in LOWER_IS_BETTER) else WORSE_COLOUR
            error = None if interval is None else [[mean - scale * interval[0]], [scale * interval[1] - mean]]
            axis.errorbar(mean, row, xerr=error, fmt="o", color=colour, markersize=4, capsize=2, linewidth=1.2)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_title(f"{label}{' (lower is better)' if key in LOWER_IS_BETTER else ''}"
                       f"{' (points)' if scale == 100 else ''}", fontsize=9)
        axis.tick_params(labelsize=7)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_ylim(len(labels) - 0.5, -0.5)
    figure.suptitle(f"paired differences on {split}: run minus baseline, mean over seeds and 95% interval "
                    "(green: better, red: worse, grey: interval includes 0)", fontsize=10)
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


def robustness_section(robustness: dict[str, list[dict]], estimates: dict[str, dict], heading: str) -> str:
    settings = sorted({describe_robustness(seed) for seeds in robustness.values() for seed in seeds})
    return "\n\n".join([
        f"{heading} Robustness",
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


@dataclass
class SplitReport:
    """One split's rows (targets first), their estimates and paired differences, and what its cache's targets
    measured (None without a cache)."""

    split: str
    runs: dict[str, list[dict]]
    targets: set[str]
    pairs: list[tuple[str, str]]
    estimates: dict[str, dict]
    paired: dict[str, dict]
    quality: dict | None


def split_report(config: ReportConfig, split: str, evaluations: dict[str, list[dict]],
                 cache: CacheReader | None) -> SplitReport:
    runs: dict[str, list[dict]] = {}
    targets: set[str] = set()
    evaluations = dict(evaluations)
    if "teacher" in evaluations:
        runs["teacher"] = evaluations.pop("teacher")
        targets.add("teacher")
    quality = None
    if cache is not None:
        cache_rows, quality = target_rows(config, cache)
        runs.update({name: [metrics] for name, metrics in cache_rows.items()})
        targets.update(cache_rows)
    runs.update(evaluations)
    pairs = comparisons(config, runs, targets)
    estimates = {name: run_estimates(results) for name, results in runs.items()}
    paired = {pair_name(name, baseline): paired_estimates(runs, name, baseline) for name, baseline in pairs}
    return SplitReport(split, runs, targets, pairs, estimates, paired, quality)


def overlap_text(quality: dict) -> str:
    return (f"Teacher and CLIP on the {quality['samples_evaluated']} images of the cache: "
            f"{describe_overlap(quality['error_overlap'])}.")


def weightings_section(sweep: list[dict], heading: str) -> str:
    """The best weightings of a store's sources, by fusion, from target_quality's weight sweep."""
    lines = ["| fusion | weights | top-1 | NLL | ECE |", "|---|---|---:|---:|---:|"]
    lines += [f"| {row['clip_scale']} | {describe_weights({n: w for n, w in row['weights'].items() if w > 0})} | "
              f"{percent(row['top1'])} | {row['nll']:.3f} | {percent(row['ece'])} |" for row in best_weightings(sweep)]
    return "\n\n".join([
        f"{heading} Fused targets by weights",
        "The best weightings of the cache's sources for each fusion (raw cosines, each CLIP at its own scale, every "
        "source z-scored), of every weighting in steps of 0.1 that sums to 1, by top-1 then NLL.",
        "\n".join(lines),
    ])


def split_sections(config: ReportConfig, report: SplitReport, out: Path, heading: str, suffix: str) -> list[str]:
    """The markdown of one split: its table, its paired differences and its figures (drawn into `out`, their file
    names ending in `suffix`)."""
    runs, estimates, targets, split = report.runs, report.estimates, report.targets, report.split
    figures = {"accuracy": f"accuracy{suffix}.png"}
    plot_accuracy(estimates, targets, split, out / figures["accuracy"])
    if report.paired:
        figures["paired differences"] = f"paired_differences{suffix}.png"
        plot_paired_differences(report.pairs, report.paired, split, out / figures["paired differences"])
    binned = {name: results for name, results in runs.items() if all("reliability" in result for result in results)}
    if binned:  # evaluations written by hand may have no bins
        figures["reliability"] = f"reliability{suffix}.png"
        plot_reliability(binned, estimates, out / figures["reliability"])
    figures["confidence"] = f"confidence{suffix}.png"
    plot_confidence(estimates, targets, config.confidence_threshold, out / figures["confidence"])
    if report.quality is not None and report.quality.get("alpha_sweep"):
        figures["alpha sweep"] = f"alpha_sweep{suffix}.png"
        plot_alpha_sweep(report.quality["alpha_sweep"], split, out / figures["alpha sweep"])
    sections = [markdown_table(estimates, targets)]
    if report.quality is not None and "error_overlap" in report.quality:
        sections.append(overlap_text(report.quality))
    if report.quality is not None and report.quality.get("weight_sweep"):
        sections.append(weightings_section(report.quality["weight_sweep"], heading))
    if report.paired:
        sections.append(paired_section(report.pairs, report.paired, heading))
    sections += [f"![{name}]({file})" for name, file in figures.items()]
    robustness = {name: [result["robustness"] for result in results if "robustness" in result]
                  for name, results in runs.items() if any("robustness" in result for result in results)}
    if robustness:
        plot_robustness(robustness, targets, out / f"robustness{suffix}.png")
        sections += [robustness_section(robustness, estimates, heading), f"![robustness](robustness{suffix}.png)"]
    return sections


# The preconditions of RichKD's regime (docs/study.md): bounds on the targets and the label-only run.
TEACHER_TOP1_RANGE = (0.55, 0.85)
TEACHER_OVER_LABEL_ONLY = 0.03
CLIP_WITHIN_TEACHER = 0.10
FUSED_OVER_BETTER_SOURCE = 0.03


def preconditions(config: ReportConfig, reports: dict[str, SplitReport]) -> list[dict]:
    """Each precondition: what it measures, the measured value, the requirement and whether it is met. In
    distribution is the first split besides the shifted one that has a cache."""
    shifted = reports.get(config.shifted_split)
    if shifted is None or shifted.quality is None:
        raise UserError(f"--shifted-split {config.shifted_split}: the preconditions need a --test-cache of that split")
    in_dist = next((report for split, report in reports.items()
                    if split != config.shifted_split and report.quality is not None), None)
    if in_dist is None:
        raise UserError("the preconditions need a --test-cache of an in-distribution split besides the shifted one")
    if config.label_only not in in_dist.estimates:
        raise UserError(f"--label-only {config.label_only}: no evaluation of that run on {in_dist.split}")
    label_only = in_dist.estimates[config.label_only]["top1"]["mean"]
    (teacher, clip, fused), (teacher_shifted, clip_shifted, fused_shifted) = (
        [report.quality[name] for name in ("teacher", "clip", "fused")] for report in (in_dist, shifted))
    fused_name = fused_row_name(config).removeprefix("fused targets ")
    low, high = TEACHER_TOP1_RANGE

    def points(value: float) -> str:
        return f"{100 * value:+.1f} points"

    def check(what: str, value: float, shown: str, required: str, met: bool) -> dict:
        return {"check": what, "value": value, "measured": shown, "required": required, "met": bool(met)}

    gain = fused_shifted["top1"] - max(teacher_shifted["top1"], clip_shifted["top1"])
    return [
        check(f"teacher top-1 on {in_dist.split}", teacher["top1"], percent(teacher["top1"]),
              f"{percent(low, 0)} to {percent(high, 0)}", low <= teacher["top1"] <= high),
        check(f"teacher minus {config.label_only} (mean over seeds), top-1 on {in_dist.split}",
              teacher["top1"] - label_only, points(teacher["top1"] - label_only),
              f"at least {points(TEACHER_OVER_LABEL_ONLY)}", teacher["top1"] - label_only >= TEACHER_OVER_LABEL_ONLY),
        check(f"CLIP minus teacher, top-1 on {shifted.split}", clip_shifted["top1"] - teacher_shifted["top1"],
              points(clip_shifted["top1"] - teacher_shifted["top1"]), "at least +0.0 points",
              clip_shifted["top1"] >= teacher_shifted["top1"]),
        check(f"CLIP minus teacher, top-1 on {in_dist.split}", clip["top1"] - teacher["top1"],
              points(clip["top1"] - teacher["top1"]), f"within ±{100 * CLIP_WITHIN_TEACHER:.1f} points",
              abs(clip["top1"] - teacher["top1"]) <= CLIP_WITHIN_TEACHER),
        check(f"fused {fused_name} minus the better of teacher and CLIP, top-1 on {shifted.split}",
              gain, points(gain), f"at least {points(FUSED_OVER_BETTER_SOURCE)}", gain >= FUSED_OVER_BETTER_SOURCE),
        check(f"fused minus teacher, top-1 on {in_dist.split}", fused["top1"] - teacher["top1"],
              points(fused["top1"] - teacher["top1"]), "at least +0.0 points", fused["top1"] >= teacher["top1"]),
        *(check(f"fused minus teacher, NLL on {report.split}", fused_nll - teacher_nll,
                f"{fused_nll - teacher_nll:+.3f}", "below 0", fused_nll < teacher_nll)
          for report, fused_nll, teacher_nll in ((in_dist, fused["nll"], teacher["nll"]),
                                                 (shifted, fused_shifted["nll"], teacher_shifted["nll"]))),
    ]


def preconditions_section(checks: list[dict]) -> str:
    lines = ["| precondition | measured | required | met |", "|---|---:|---|---|"]
    lines += [f"| {row['check']} | {row['measured']} | {row['required']} | {'yes' if row['met'] else '**no**'} |"
              for row in checks]
    return "\n\n".join([
        "## Preconditions of RichKD's regime",
        "Measured on the targets of the held-out caches (the teacher's and CLIP's logits on the centre views) and on "
        "the label-only run, before the other students are read: a teacher that knows more than the students' "
        "architecture learns from the labels, a CLIP about as good in distribution and better under shift, and fused "
        "targets better than either under shift.",
        "\n".join(lines),
    ])


def run(config: ReportConfig) -> dict:
    if config.preconditions_only:
        config = dataclasses.replace(config, runs=["teacher", config.label_only], baselines=[], pairs=[])
    evaluations = load_evaluations(config)
    caches = open_test_caches(config)
    splits = list(dict.fromkeys([*evaluations, *caches]))
    reports = {split: split_report(config, split, evaluations.get(split, {}), caches.get(split))
               for split in splits}
    checks = preconditions(config, reports) if config.shifted_split is not None else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        "# RichKD report",
        f"Held-out {'splits' if len(splits) > 1 else 'split'} {', '.join(splits)}; *italic* rows are targets, the rest "
        "students. Each cell is the mean over the run's n seeds ± the half-width of its Student-t 95% interval (the "
        f"value alone for one seed). Confident: probability >= {config.confidence_threshold}; confident-correct and "
        "confidently-wrong are shares of all samples; the superclass share is the share of the probability off the "
        "true class that falls on the other classes of its superclass (mean over samples).",
    ]
    if checks is not None:
        sections.append(preconditions_section(checks))
    for number, (split, report) in enumerate(reports.items()):
        heading = "##" if len(splits) == 1 else "###"
        if len(splits) > 1:
            sections.append(f"## {split}")
        sections += split_sections(config, report, out, heading, "" if number == 0 else f"_{split}")
    (out / "report.md").write_text("\n\n".join(sections) + "\n")
    summary = {"splits": {split: {"runs": report.estimates, "paired": report.paired,
                                  **({"error_overlap": report.quality["error_overlap"]}
                                     if report.quality and "error_overlap" in report.quality else {})}
                          for split, report in reports.items()}}
    if checks is not None:
        summary["preconditions"] = checks
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    unmet = [row["check"] for row in checks or () if not row["met"]]
    if config.require_preconditions and unmet:
        raise UserError(f"{len(unmet)} of the {len(checks)} preconditions are not met ({'; '.join(unmet)}): see "
                        f"{out / 'report.md'}")
    if config.json:
        print_json(summary)
    else:
        console.print(f"report written to {out / 'report.md'}")
    return summary
