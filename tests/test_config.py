"""Flags: the seed's names and defaults, --help, and one-line refusals of bad combinations."""

import subprocess
import sys

from embedrag.config import TrainConfig, build_parser
from embedrag.train.checks import parse_args
from tests.helpers import ROOT

SEED_DEFAULTS = {"finetune_type": "qlora", "quantization_bits": 4, "lr": 1e-4, "epochs": 2,
                 "neg_nums": 2, "temperature": 0.02, "query_max_len": 256,
                 "passage_max_len": 1024, "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
                 "save_on_epoch_end": 1, "warmup_proportion": 0.05}


def _required(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "q", "pos": ["p"]}\n')
    return ["--model_name_or_path", "org/model", "--train_dataset", str(data),
            "--output_dir", str(tmp_path / "out"), "--batch_size", "2"]


def test_seed_defaults(tmp_path):
    """The seed's defaults hold; the embedding settings among them are decided when training
    starts (a model's own recipe comes first), and are the seed's for a model without one."""
    from embedrag.model.recipe import DEFAULTS, Recipe, decide

    cfg = parse_args(_required(tmp_path))
    decided, sources = decide({name: getattr(cfg, name) for name in DEFAULTS}, Recipe())
    for name, value in SEED_DEFAULTS.items():
        assert decided.get(name, getattr(cfg, name)) == value, name
    assert decided["pooling"] == "last" and cfg.trust_remote_code is False
    assert set(sources.values()) == {"default"}


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert f"--{action.dest}" in out
            assert action.help and len(action.help) > 10, action.dest
    assert len([a for a in parser._actions if a.dest != "help"]) == len(
        TrainConfig.__dataclass_fields__)


def test_every_flag_the_readme_names_exists():
    """`--help` is where flags are documented; the README names some, and those must be real
    flags of the scripts (or of the pip, pytest and tensorboard commands it shows)."""
    import re

    readme = open(f"{ROOT}/README.md", encoding="utf-8").read()
    helps = "".join(subprocess.run([sys.executable, script, "--help"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout
                    for script in ("train.py", "evaluate.py", "merge.py"))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", readme))
    assert len(named) > 20
    others = {"--index-url", "--dist", "--help", "--logdir"}
    assert {f for f in named - others if f not in helps} == set()
    assert "train.py --help" in readme
