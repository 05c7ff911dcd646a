"""evaluation.ipynb runs headless top to bottom (papermill) on a tiny trained model."""

import json

import pytest

from tests.conftest import ROOT
from tests.test_trainer import run_train

papermill = pytest.importorskip("papermill")


def test_notebook_executes_and_reports_the_same_metrics(tiny_decoder, learnable_data, tmp_path):
    import nbformat

    out = tmp_path / "run"
    assert run_train(tiny_decoder, learnable_data, out, "--finetune_type", "lora",
                     "--save_on_epoch_end", "0", "--eval_dataset", learnable_data)[0] == 0
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        f"{ROOT}/evaluation.ipynb", str(executed), cwd=ROOT, kernel_name="python3",
        parameters={"model_path": str(out / "final"), "eval_dataset": learnable_data,
                    "pooling": "last", "training_output": str(out)}, progress_bar=False)
    nb = nbformat.read(str(executed), as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    report = json.loads((out / "training_summary_report.json").read_text())
    after = report["eval"]["metrics"]["ndcg@10"]["after"]
    assert f"{after:.4f}" in text  # the notebook's metrics table matches training's eval
    assert "doc 1:" in text and "max |manual - encode| =" in text
    diff = float(text.split("max |manual - encode| =")[1].split()[0])
    assert diff < 1e-5  # the seed-style manual pooling equals EmbeddingModel.encode
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the loss plot
