"""The study's pictures (matplotlib, Agg backend: no display needed).

- `accuracy.png`: test accuracy and 10-shot accuracy per model, bars with
  the 95% t interval of the mean over seeds as error bars.
- `differences.png`: each router's paired difference against the dense ViT
  and against Softmax Token Choice, with its interval as error bars.
- `training_curves.png`: training loss per epoch per model (mean over seeds).
- `routing.png`: for a few test images, which expert each patch goes to in
  the last MoE layer, one row per router, as in the V-MoE paper's routing
  figures; grey patches reach no expert.
"""

import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from keras_vmoe.study.statistics import half_width_of  # noqa: E402

UNROUTED_COLOR = (0.88, 0.88, 0.88, 1.0)


def expert_colors(num_experts):
    """Distinct colours for the experts, none of them grey (grey = unrouted).

    Example:
    >>> len(expert_colors(8)), len(expert_colors(16))
    (8, 16)
    """
    if num_experts <= 9:
        palette = [plt.cm.tab10(i) for i in range(10) if i != 7]  # no grey
    else:
        palette = [plt.cm.tab20(i) for i in range(20) if i not in (14, 15)]
        extra = max(num_experts - len(palette), 0)
        palette += [plt.cm.hsv(i / max(extra, 1)) for i in range(extra)]
    return palette[:num_experts]


def _short(name):
    return name.replace("_expert_choice", " EC").replace("_token_choice", " TC")


def plot_accuracy(summary, path, shot=10):
    """Bar charts of test accuracy and `shot`-shot accuracy per model.

    Args:
        summary: dict from `report.summarize`.
        path: str. PNG file to write.
        shot: int. Which few-shot accuracy. Defaults to `10`.

    Returns:
        str, the path.

    Example:

    ```python
    plot_accuracy(report.summarize(runs), "study_output/accuracy.png")
    ```
    """
    models = list(summary)
    panels = (("test_accuracy", "Animal-MNIST test accuracy"),)
    panels += ((f"fewshot_{shot}shot", f"digits {shot}-shot linear accuracy"),)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.tab10(np.arange(len(models)) % 10)
    for ax, (metric, title) in zip(axes, panels):
        means, errors = [], []
        for model in models:
            stat = summary[model].get(metric) or {"mean": None, "std": None}
            means.append(np.nan if stat["mean"] is None else stat["mean"])
            seeds = summary[model]["seeds"]
            std = stat["std"]
            errors.append(0.0 if std is None else half_width_of(std, seeds))
        x = np.arange(len(models))
        # Error bars only where there is a spread (two seeds or more).
        has_spread = any(
            (summary[m].get(metric) or {}).get("std") is not None for m in models
        )
        yerr = errors if has_spread else None
        ax.bar(x, means, yerr=yerr, color=colors, capsize=4)
        for xi, m in zip(x, means):
            if np.isfinite(m):
                ax.text(xi, m + 0.01, f"{m:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [_short(m) for m in models], rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    seeds = max(entry["seeds"] for entry in summary.values())
    if seeds > 1:
        fig.suptitle(
            f"Routers at equal compute (mean over {seeds} seeds, 95% t interval)"
        )
    else:
        fig.suptitle("Routers at equal compute (one seed: no spread measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


DIFFERENCE_PANELS = (
    ("test_accuracy", "test accuracy"),
    ("fewshot_10shot", "10-shot accuracy"),
)
BASELINE_MARKERS = (
    ("dense", "o", "vs dense ViT"),
    ("softmax_token_choice", "s", "vs softmax TC"),
)


def plot_differences(comparisons, models, path):
    """Paired differences against the baselines, with interval error bars.

    Args:
        comparisons: dict from `verdict.paired_comparisons`.
        models: sequence of model names, in plot order.
        path: str. PNG file to write.

    Returns:
        str, the path.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(models))
    for ax, (metric, title) in zip(axes, DIFFERENCE_PANELS):
        ax.axhline(0.0, color="black", linewidth=0.8)
        for offset, (baseline, marker, label) in zip((-0.12, 0.12), BASELINE_MARKERS):
            xs, means, lows, highs = [], [], [], []
            for xi, model in zip(x, models):
                entry = comparisons.get(model, {}).get(baseline, {}).get(metric)
                if entry is None:
                    continue
                xs.append(xi + offset)
                means.append(entry["mean"])
                low = entry["mean"] if entry["low"] is None else entry["low"]
                high = entry["mean"] if entry["high"] is None else entry["high"]
                lows.append(entry["mean"] - low)
                highs.append(high - entry["mean"])
            if xs:
                ax.errorbar(
                    xs, means, yerr=[lows, highs], fmt=marker, capsize=4, label=label
                )
        ax.set_xticks(x, [_short(m) for m in models], rotation=30, ha="right")
        ax.set_title(f"difference in {title}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Paired differences over seeds (95% t interval; 0 = no difference)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(summary, path):
    """Training loss per epoch per model (mean over seeds).

    Args:
        summary: dict from `report.summarize` (its `loss_curve` entries).
        path: str. PNG file to write.

    Returns:
        str, the path.

    Example:

    ```python
    plot_training_curves(report.summarize(runs), "study_output/curves.png")
    ```
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (model, entry) in enumerate(summary.items()):
        curve = entry.get("loss_curve") or []
        epochs = np.arange(1, len(curve) + 1)
        style = "--" if model == "dense" else "-"
        ax.plot(
            epochs,
            curve,
            style,
            marker="o",
            color=plt.cm.tab10(i % 10),
            label=_short(model),
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (incl. auxiliary)")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing(expert_maps, images, num_experts, path):
    """Expert per patch in the last MoE layer, one row per router.

    Args:
        expert_maps: dict `{router: int array (N, grid, grid)}`, `-1` for
            patches that reach no expert.
        images: float array `(N, H, W, 1)` in [-1, 1]: the same test images.
        num_experts: int. Number of experts (colours).
        path: str. PNG file to write.

    Returns:
        str, the path.

    Example:

    ```python
    maps = {"soft": patch_expert_maps(last_routing(model, x[:8]), 17, 4)}
    plot_routing(maps, x[:8], num_experts=8, path="routing.png")
    ```
    """
    routers = [name for name, m in expert_maps.items() if m is not None]
    n = len(images)
    rows = len(routers) + 1
    fig, axes = plt.subplots(
        rows, n, figsize=(1.3 * n + 2.2, 1.3 * rows + 0.6), squeeze=False
    )
    colors = [UNROUTED_COLOR] + expert_colors(num_experts)
    cmap = ListedColormap(colors)
    size = images.shape[1]
    for j in range(n):
        axes[0, j].imshow(images[j].mean(axis=-1), cmap="gray", vmin=-1, vmax=1)
    axes[0, 0].set_ylabel("image", rotation=0, ha="right", va="center", fontsize=9)
    for i, router in enumerate(routers, start=1):
        maps = expert_maps[router]
        for j in range(n):
            ax = axes[i, j]
            ax.imshow(images[j].mean(axis=-1), cmap="gray", vmin=-1, vmax=1)
            ax.imshow(
                maps[j] + 1,  # -1 (unrouted) -> colour 0 (grey)
                cmap=cmap,
                vmin=-0.5,
                vmax=num_experts + 0.5,
                alpha=0.65,
                interpolation="nearest",
                extent=(-0.5, size - 0.5, size - 0.5, -0.5),
            )
        axes[i, 0].set_ylabel(
            _short(router), rotation=0, ha="right", va="center", fontsize=9
        )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colors[e + 1]) for e in range(num_experts)
    ]
    labels = [f"expert {e}" for e in range(num_experts)]
    handles.append(plt.Rectangle((0, 0), 1, 1, color=UNROUTED_COLOR))
    labels.append("no expert")
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(
        "Expert per patch in the last MoE layer (Token/Expert Choice: largest "
        "combine weight; Soft MoE: largest dispatch weight)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 0.84, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(
    output_dir, summary, expert_maps, images, num_experts, comparisons=None
):
    """Writes `accuracy.png`, `training_curves.png`, `routing.png` and
    `differences.png`.

    Args:
        output_dir: str. An existing directory.
        summary: dict from `report.summarize`.
        expert_maps: dict `{router: (N, grid, grid) int array or None}`.
        images: array `(N, H, W, 1)`. The images of the maps.
        num_experts: int.
        comparisons: dict from `verdict.paired_comparisons` or None.

    Returns:
        dict `{kind: path}` (no `"routing"` without any router maps, no
        `"differences"` without comparisons).
    """
    paths = {
        "accuracy": plot_accuracy(summary, os.path.join(output_dir, "accuracy.png")),
        "training_curves": plot_training_curves(
            summary, os.path.join(output_dir, "training_curves.png")
        ),
    }
    if comparisons:
        paths["differences"] = plot_differences(
            comparisons, list(summary), os.path.join(output_dir, "differences.png")
        )
    if any(m is not None for m in expert_maps.values()):
        paths["routing"] = plot_routing(
            expert_maps, images, num_experts, os.path.join(output_dir, "routing.png")
        )
    return paths
