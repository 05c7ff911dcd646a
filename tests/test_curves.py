"""training_curves.png: drawn at the end of a run from its logs, and showing exactly them."""

import json

import pytest

from embedrag.publish.curves import curve_data, plot_curves, write_curves


def test_the_picture_holds_the_logged_loss_rate_and_metrics(cli_run):
    import matplotlib.image

    out, done = cli_run
    steps = json.loads((out / "detailed_training_logs.json").read_text())
    summary = json.loads((out / "training_summary_report.json").read_text())
    assert f"training curves: {out / 'training_curves.png'}" in done.stdout
    image = matplotlib.image.imread(str(out / "training_curves.png"))
    assert image.shape[:2] == (340, 1320)  # 3 panels of 4.4 x 3.4 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas

    fig = plot_curves(curve_data(str(out)))
    loss, rate, evaluation = fig.axes
    assert list(loss.lines[0].get_xdata()) == [r["step"] for r in steps] == [1, 2, 3]
    assert list(loss.lines[0].get_ydata()) == [r["loss"] for r in steps]
    assert list(rate.lines[0].get_ydata()) == [r["learning_rate"] for r in steps]
    assert [line.get_xdata()[0] for line in loss.lines[1:]] == [2.5]  # epoch 2 starts at step 3
    metrics = summary["eval"]["metrics"]
    assert [line.get_label() for line in evaluation.lines] == list(metrics)
    for line in evaluation.lines:
        epochs = summary["eval"]["per_epoch"]
        assert list(line.get_xdata()) == [0, 1, 2]
        assert list(line.get_ydata()) == pytest.approx(
            [metrics[line.get_label()]["before"], *(e[line.get_label()] for e in epochs)])


def test_without_evaluation_two_panels_and_without_steps_no_picture(tmp_path):
    (tmp_path / "detailed_training_logs.json").write_text("[]\n")
    assert write_curves(str(tmp_path)) is None and not (tmp_path / "training_curves.png").exists()
    records = [{"step": s, "epoch": 1, "loss": 3.0 / s, "learning_rate": 1e-4} for s in (1, 2)]
    (tmp_path / "detailed_training_logs.json").write_text(json.dumps(records))
    path = write_curves(str(tmp_path))
    assert path == str(tmp_path / "training_curves.png")
    assert len(plot_curves(curve_data(str(tmp_path))).axes) == 2
