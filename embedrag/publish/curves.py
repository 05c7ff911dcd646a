"""training_curves.png: a run's loss, learning rate and evaluation metrics as one picture.

TensorBoard holds the same numbers, but needs a server to look at them, and a model card or a
message cannot carry it. The picture is drawn from the run's JSON logs (never from state in
memory), so what it shows is what the logs hold, and it can be redrawn for any finished run:
`write_curves(output_dir)`. Drawn with matplotlib's object API on the Agg canvas: no pyplot,
no global backend switched in a notebook that imports this.
"""

from __future__ import annotations

import os
from typing import Any

from embedrag.io import read_json, replacing

FILE = "training_curves.png"


def curve_data(output_dir: str, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The series the picture shows, from output_dir's logs: per logged step the loss and the
    learning rate, the steps where epochs began, and per epoch (0 = before training) each
    evaluation metric, when the run evaluated."""
    steps = read_json(os.path.join(output_dir, "detailed_training_logs.json")) or []
    summary = summary or read_json(os.path.join(output_dir, "training_summary_report.json")) or {}
    data: dict[str, Any] = {
        "step": [r["step"] for r in steps],
        "loss": [r["loss"] for r in steps],
        "learning_rate": [r["learning_rate"] for r in steps],
        "epoch_starts": [r["step"] for prev, r in zip(steps, steps[1:], strict=False)
                         if r["epoch"] != prev["epoch"]],
        "eval": {},
    }
    evaluated = summary.get("eval")
    if evaluated:
        per_epoch = [(0, {m: v["before"] for m, v in evaluated["metrics"].items()})]
        per_epoch += [(e["epoch"], e) for e in evaluated["per_epoch"]]
        data["eval"] = {"epoch": [e for e, _ in per_epoch],
                        **{m: [values[m] for _, values in per_epoch]
                           for m in evaluated["metrics"]}}
    return data


def plot_curves(data: dict[str, Any], title: str = "") -> Any:
    """A matplotlib Figure: loss | learning rate | evaluation metrics (when there are any)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = 3 if data["eval"] else 2
    fig = Figure(figsize=(4.4 * panels, 3.4), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels)
    loss, lr = axes[0], axes[1]
    loss.plot(data["step"], data["loss"], color="tab:blue", label="training loss")
    loss.set(xlabel="optimizer step", ylabel="InfoNCE loss", title="loss")
    lr.plot(data["step"], data["learning_rate"], color="tab:orange")
    lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss, lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for step in data["epoch_starts"]:
            ax.axvline(step - 0.5, color="grey", linestyle=":", linewidth=1)
    if data["eval"]:
        ev = axes[2]
        for metric in (m for m in data["eval"] if m != "epoch"):
            ev.plot(data["eval"]["epoch"], data["eval"][metric], marker="o", label=metric)
        ev.set(xlabel="epoch (0 = before training)", ylabel="score", title="evaluation")
        ev.set_xticks(data["eval"]["epoch"])
        ev.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title)
    return fig


def write_curves(output_dir: str, summary: dict[str, Any] | None = None) -> str | None:
    """Draw output_dir's logs into output_dir/training_curves.png; its path, or None when the
    run logged no step (nothing to draw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    summary = summary or read_json(os.path.join(output_dir, "training_summary_report.json"))
    data = curve_data(output_dir, summary)
    if not data["step"]:
        return None
    config = (summary or {}).get("config") or {}
    base = config.get("model_name_or_path")
    title = f"{config.get('finetune_type', '')} on {os.path.basename(os.path.normpath(base))}" \
        if base else ""
    fig = plot_curves(data, title)
    path = os.path.join(output_dir, FILE)
    with replacing(path) as tmp:
        FigureCanvasAgg(fig).print_png(tmp)
    return path
