"""evaluation.ipynb runs headless top to bottom (papermill) on a trained model, as a user runs it
after `pip install -r requirements.txt` plus Jupyter: in a kernel where every installed package
that those requirements do not bring is hidden, as if it were not installed."""

import ast
import importlib.metadata as metadata
import json
import sys

import papermill
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import ROOT

JUPYTER = ["ipykernel"]  # what runs a notebook's code; "plus Jupyter" in the README


def requirements(path=f"{ROOT}/requirements.txt"):
    """The distributions a requirements file names (canonical names)."""
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(canonicalize_name(Requirement(line).name))
    return names


def with_dependencies(names):
    """The names and everything they depend on, by the installed packages' metadata."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in map(Requirement, needs):
            if spec.marker is None or spec.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(spec.name))
    return seen


def hidden_modules(allowed):
    """Top-level modules of installed distributions outside `allowed`."""
    return sorted(module for module, dists in metadata.packages_distributions().items()
                  if not any(canonicalize_name(d) in allowed for d in dists)
                  and module not in sys.stdlib_module_names and module.isidentifier())


def notebook_imports(path=f"{ROOT}/evaluation.ipynb"):
    """Top-level names of the modules the notebook's code cells import."""
    import nbformat

    names = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_package_the_notebook_imports_is_a_runtime_requirement():
    runtime = set(requirements())
    dists = metadata.packages_distributions()
    for module in notebook_imports() - set(sys.stdlib_module_names) - {"embedrag"}:
        assert {canonicalize_name(d) for d in dists.get(module, [module])} & runtime, module
    assert "matplotlib" in runtime  # the plotting cell's; once only in the test requirements
    assert "matplotlib" not in requirements(f"{ROOT}/requirements-test.txt")


def test_notebook_executes_from_the_runtime_requirements_alone(cli_run, tmp_path, monkeypatch):
    import nbformat

    out, _ = cli_run
    hidden = hidden_modules(with_dependencies(requirements() + JUPYTER))
    assert {"sentence_transformers", "sklearn", "pytest"} <= set(hidden)  # test-only packages
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"  # None in sys.modules: `import x` fails and find_spec says "absent"
        f"for name in {hidden!r}:\n    sys.modules.setdefault(name, None)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        f"{ROOT}/evaluation.ipynb", str(executed), cwd=ROOT, kernel_name="python3",
        parameters={"model_path": str(out / "final"),
                    "eval_dataset": str(out.parent / "eval.jsonl"), "pooling": "last",
                    "training_output": str(out)}, progress_bar=False)
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
