"""PNG plots of probe results (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STYLE = {"pretrained": ("tab:blue", "-"), "random-init": ("tab:orange", "--"), "raw-pixels": ("tab:gray", ":"),
         "tf-idf": ("tab:gray", ":")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(rows: list[dict], x_key: str = "n_labelled"):
    """rows of one line -> (x, mean accuracy, std accuracy), sorted by fraction."""
    by_fraction: dict[float, list[dict]] = {}
    for row in rows:
        by_fraction.setdefault(row["fraction"], []).append(row)
    fractions = sorted(by_fraction)
    x = np.array([np.mean([r[x_key] for r in by_fraction[f]]) for f in fractions])
    acc = [np.array([r["accuracy"] for r in by_fraction[f]]) for f in fractions]
    return x, np.array([a.mean() for a in acc]), np.array([a.std() for a in acc])


def _line(ax, rows, label, color=None, style="-"):
    x, mean, std = _curve(rows)
    (line,) = ax.plot(x, mean, style, marker="o", ms=4, color=color, label=label)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_probe_curves(rows: list[dict], path: Path, title: str = "") -> Path:
    """Accuracy vs labelled examples (log x): one panel per probe, one line per init, mean over
    seeds with a +-1 std band."""
    plt = _pyplot()
    probes = list(dict.fromkeys(r["probe"] for r in rows))
    fig, axes = plt.subplots(1, len(probes), figsize=(5.5 * len(probes), 4.2), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        for init in dict.fromkeys(r["init"] for r in rows):
            line_rows = [r for r in rows if r["probe"] == probe and r["init"] == init]
            color, style = STYLE.get(init, (None, "-"))
            _line(ax, line_rows, init, color, style)
        _axes(ax, f"{probe} probe", "labelled training examples (log)")
    return _save(plt, fig, path, title)


def plot_comparison(lines: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Linear-probe accuracy vs label fraction (log x), one line per run ({label: probe rows});
    labels starting with "random-init" are drawn dashed, baselines dotted."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(rows[0]["task"] for rows in lines.values() if rows))
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, rows in lines.items():
            if not rows or rows[0]["task"] != task:
                continue
            style = "--" if label.startswith("random-init") else ":" if label.startswith(tuple(STYLE)) else "-"
            color = "gray" if style != "-" else None
            x, mean, std = _curve(rows, "fraction")
            (line,) = ax.plot(x, mean, style, marker="o", ms=4, color=color, label=label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        _axes(ax, f"linear probe on {task}", "label fraction (log)")
    return _save(plt, fig, path, title)


def _save(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _axes(ax, title: str, xlabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
