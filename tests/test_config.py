"""Flags: the seed's names and defaults, --help, and one-line refusals of bad combinations."""

import subprocess
import sys

import pytest

from embedrag.config import TrainConfig, build_parser, parse_args
from tests.conftest import ROOT

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
    cfg = parse_args(_required(tmp_path))
    for name, value in SEED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.pooling == "last" and cfg.trust_remote_code is False


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


@pytest.mark.parametrize("extra, message", [
    (["--finetune_type", "prefix"], "invalid choice: 'prefix'"),
    (["--quantization_bits", "3"], "invalid choice: 3"),
    (["--finetune_type", "full", "--quantization_bits", "8"], "applies to qlora only"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--query_max_len", "0"], "--query_max_len must be positive"),
    (["--neg_nums", "-1"], "--neg_nums must not be negative"),
    (["--model_name_or_path", "./no/such/model"], "no such folder"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(_required(tmp_path) + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_readme_documents_every_flag():
    readme = open(f"{ROOT}/README.md", encoding="utf-8").read()
    for name in TrainConfig.__dataclass_fields__:
        assert f"`--{name}`" in readme, name
