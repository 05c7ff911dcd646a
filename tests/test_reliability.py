"""Refusing bad input cleanly, never clobbering results, exact resume after a kill, NaN stops."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train as train_script
from tests.helpers import ENV, ROOT, learnable_rows, max_diff, run_train, weights, write_jsonl

GOOD = '{"query": "q", "pos": ["a"], "neg": ["b"]}\n'
DATA_CASES = [  # (file bytes, line, message)
    (b"not json\n", 1, "not valid JSON"),
    (b'["a list"]\n', 1, "expected a JSON object, got list"),
    (b'{"pos": ["a"]}\n', 1, "missing 'query'"),
    (b'{"query": "", "pos": ["a"]}\n', 1, "'query' is empty"),
    (b'{"query": 7, "pos": ["a"]}\n', 1, "'query' must be a string, got int"),
    (b'{"query": "q"}\n', 1, "missing 'pos'"),
    (b'{"query": "q", "pos": []}\n', 1, "'pos' is empty"),
    (b'{"query": "q", "pos": "a"}\n', 1, "'pos' must be a list of strings, got str"),
    (b'{"query": "q", "pos": ["a", null]}\n', 1, "'pos[1]' must be a string, got NoneType"),
    (b'{"query": "q", "pos": ["a"], "neg": [1]}\n', 1, "'neg[0]' must be a string, got int"),
    (b'{"query": "q", "pos": ["a"], "neg": "b"}\n', 1, "'neg' must be a list of strings"),
    (b"", 1, "the file holds no training rows"),
    (b"\n  \n\n", 1, "the file holds no training rows"),
    (GOOD.encode() + '{"query": "caf\xe9", "pos": ["a"]}\n'.encode("latin-1"), 2, "not UTF-8"),
    (GOOD.encode() * 3 + b"{oops\n", 4, "not valid JSON"),
]


@pytest.mark.parametrize("content, line, message", DATA_CASES)
def test_bad_data_exit_2_naming_the_line(content, line, message, tiny_decoder, tmp_path,
                                         capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    code = train_script.main(["--model_name_or_path", tiny_decoder, "--train_dataset", str(data),
                              "--output_dir", str(out), "--batch_size", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"train.py: error: {data}:{line}: {message}" in err, err
    assert "Traceback" not in err and not out.exists()


FLAG_CASES = [
    (["--finetune_type", "adapter"], "invalid choice: 'adapter'"),
    (["--quantization_bits", "2"], "invalid choice: 2"),
    (["--finetune_type", "full", "--quantization_bits", "4"], "applies to qlora only, not full"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--passage_max_len", "-5"], "--passage_max_len must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-0.1"], "--temperature must be > 0"),
    (["--model_name_or_path", "/no/such/model"], "no such folder"),
    (["--model_name_or_path", "no-such-org/no-such-model"], "train.py: error:"),
    (["--eval_dataset", "/no/such.jsonl"], "--eval_dataset /no/such.jsonl: no such file"),
]


@pytest.mark.parametrize("flags, message", FLAG_CASES)
def test_bad_flags_exit_2_with_one_line(flags, message, tiny_decoder, learnable_data, tmp_path,
                                        capsys):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_decoder, "--train_dataset", learnable_data,
            "--output_dir", str(out), "--batch_size", "2", *flags]
    try:
        code = train_script.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_bom_and_crlf_train_fine(tiny_decoder, tmp_path):
    rows = learnable_rows(8)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
    data = tmp_path / "bom.jsonl"
    data.write_bytes("\ufeff".encode() + text.encode())
    assert run_train(tiny_decoder, str(data), tmp_path / "o", "--finetune_type", "lora",
                     "--max_steps", "1", "--save_on_epoch_end", "0")[0] == 0


# --- exact resume -------------------------------------------------------------------------

KINDS = {"lora": ["--finetune_type", "lora"],
         "qlora4": ["--finetune_type", "qlora", "--quantization_bits", "4"],
         "full": ["--finetune_type", "full"]}


def _cmd(model, data, out, kind, *extra, script="train.py"):
    return [sys.executable, script, "--model_name_or_path", model, "--train_dataset", data,
            "--output_dir", str(out), "--batch_size", "4", "--epochs", "2", "--lr", "2e-3",
            "--neg_nums", "2", "--temperature", "0.05", "--lora_r", "4", "--lora_alpha", "8",
            "--seed", "7", "--save_steps", "3", "--save_on_epoch_end", "0",
            *KINDS[kind], *extra]


def _in_process(model, data, out, kind, *extra):
    """`_cmd`'s run in this process (run_train's flags are _cmd's); returns the exit code."""
    return run_train(model, data, out, *KINDS[kind], "--save_steps", "3",
                     "--save_on_epoch_end", "0", *extra)[0]


def _uninterrupted(model, data, out, kind):
    """The reference run."""
    assert _in_process(model, data, out, kind) == 0


def _resume(model, data, out, kind):
    """The run continued from its latest step checkpoint, as a restarted train.py would:
    everything comes from the checkpoint on disk; returns the exit code."""
    return _in_process(model, data, out, kind, "--resume_from_checkpoint", "latest")


def _kill_when(proc, exists, timeout=120):
    deadline = time.time() + timeout
    while not exists.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


FAULTS = "tests/faults.py"  # train.py with faults injected from the test side


def _faulty(**faults):
    return {**ENV, "EMBEDRAG_FAULTS": json.dumps(faults)}


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_then_resume_equals_an_uninterrupted_run(kind, tiny_decoder, learnable_data,
                                                         tmp_path, capsys):
    whole = tmp_path / "whole"
    _uninterrupted(tiny_decoder, learnable_data, whole, kind)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(tiny_decoder, learnable_data, cut, kind, script=FAULTS),
                            cwd=ROOT, env=_faulty(sleep_per_step=0.3),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, cut / "checkpoint-step-6")  # killed during epoch 1, after step 6 or 7
    assert not (cut / "final").exists()
    logged = json.loads((cut / "detailed_training_logs.json").read_text())
    assert 6 <= len(logged) < 12
    capsys.readouterr()
    assert _resume(tiny_decoder, learnable_data, cut, kind) == 0
    assert "resuming from" in "".join(capsys.readouterr())
    assert max_diff(weights(whole / "final"), weights(cut / "final")) < 1e-5
    # the logs read as one run: every step once, same losses as the uninterrupted run
    steps = json.loads((cut / "detailed_training_logs.json").read_text())
    reference = json.loads((whole / "detailed_training_logs.json").read_text())
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in reference], abs=1e-5)
    report = json.loads((cut / "training_summary_report.json").read_text())
    assert report["totals"]["samples"] == 48 and report["totals"]["steps"] == 12


def test_kill_during_a_checkpoint_save_resumes_from_the_previous_one(tiny_decoder,
                                                                     learnable_data, tmp_path,
                                                                     capsys):
    whole = tmp_path / "whole"
    _uninterrupted(tiny_decoder, learnable_data, whole, "lora")
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(tiny_decoder, learnable_data, cut, "lora", script=FAULTS),
                            cwd=ROOT, env=_faulty(save_delay=30),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, cut / "checkpoint-step-3.tmp" / "training_state.pt")
    assert not (cut / "checkpoint-step-3").exists()  # nothing that looks complete
    capsys.readouterr()
    assert _resume(tiny_decoder, learnable_data, cut, "lora") == 2
    assert "no complete checkpoint-step-N/" in capsys.readouterr().err
    # a second attempt with a complete checkpoint behind the half-written one
    proc = subprocess.Popen(_cmd(tiny_decoder, learnable_data, cut, "lora",
                                 "--overwrite_output_dir", script=FAULTS), cwd=ROOT,
                            env=_faulty(sleep_per_step=0.2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, cut / "checkpoint-step-3")
    os.makedirs(cut / "checkpoint-step-9.tmp", exist_ok=True)  # as a kill mid-save leaves it
    assert _resume(tiny_decoder, learnable_data, cut, "lora") == 0
    assert max_diff(weights(whole / "final"), weights(cut / "final")) < 1e-5


def test_nan_stops_with_the_last_good_checkpoint_intact(tiny_decoder, learnable_data, tmp_path):
    out = tmp_path / "o"
    done = subprocess.run(_cmd(tiny_decoder, learnable_data, out, "lora", script=FAULTS),
                          cwd=ROOT, env=_faulty(nan_at_step=5), capture_output=True, text=True)
    assert done.returncode == 3
    assert "not finite at step 5 (epoch 1)" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "final").exists()
    assert sorted(p.name for p in out.glob("checkpoint-step-*")) == [
        "checkpoint-step-3", "checkpoint-step-4"]
    state = json.loads((out / "checkpoint-step-4" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in weights(out / "checkpoint-step-4").values())
    logged = json.loads((out / "detailed_training_logs.json").read_text())
    assert [r["step"] for r in logged] == [1, 2, 3, 4]


def test_resume_from_any_epoch_equals_an_uninterrupted_run(tiny_decoder, learnable_data,
                                                          tmp_path, capsys):
    """12 steps an epoch, 3 epochs, LoRA dropout on: resuming in the middle of epoch 2 and at
    its very end replays the right order, negatives and dropout (the order of an epoch is not
    the first epoch's order, so a resume that lost it would train on other batches)."""
    args = ["--finetune_type", "lora", "--batch_size", "2", "--epochs", "3", "--save_steps", "4",
            "--save_on_epoch_end", "0"]
    whole = tmp_path / "whole"
    assert run_train(tiny_decoder, learnable_data, whole, *args)[0] == 0
    reference = json.loads((whole / "detailed_training_logs.json").read_text())
    assert len(reference) == 36
    for step, micro in ((16, 4), (24, 12)):
        checkpoint = whole / f"checkpoint-step-{step}"
        state = json.loads((checkpoint / "trainer_state.json").read_text())["state"]
        assert (state["epoch"], state["micro"]) == (2, micro)
        out = tmp_path / f"from{step}"
        assert run_train(tiny_decoder, learnable_data, out, *args, "--resume_from_checkpoint",
                         str(checkpoint))[0] == 0
        assert max_diff(weights(whole / "final"), weights(out / "final")) < 1e-5
        logged = json.loads((out / "detailed_training_logs.json").read_text())
        assert [r["step"] for r in logged] == list(range(step + 1, 37))
        assert [r["loss"] for r in logged] == pytest.approx(
            [r["loss"] for r in reference[step:]], abs=1e-6)
    # flags that change the math of the remaining steps are refused, each by name
    other = write_jsonl(tmp_path / "other.jsonl", learnable_rows(12, seed=1))
    checkpoint = str(whole / "checkpoint-step-16")
    capsys.readouterr()
    for flags, named in ((["--lr", "1e-3"], "--lr 0.002 -> 0.001"),
                         (["--temperature", "0.1"], "--temperature 0.05 -> 0.1"),
                         (["--append_eos", "no"], "--append_eos 'auto' -> 'no'"),
                         (["--mixed_precision", "bf16"], "--mixed_precision 'no' -> 'bf16'"),
                         (["--warmup_proportion", "0.2"], "--warmup_proportion 0.05 -> 0.2"),
                         (["--lora_r", "8"], "--lora_r 4 -> 8"),
                         (["--finetune_type", "full"], "--finetune_type 'lora' -> 'full'")):
        code = run_train(tiny_decoder, learnable_data, tmp_path / "refused", *args, *flags,
                         "--resume_from_checkpoint", checkpoint)[0]
        err = capsys.readouterr().err
        assert code == 2 and "cannot resume with different settings" in err and named in err, err
    code = run_train(tiny_decoder, other, tmp_path / "refused", *args,
                     "--resume_from_checkpoint", checkpoint)[0]
    assert code == 2 and "--train_dataset" in capsys.readouterr().err


def test_resume_refuses_pickled_code(tiny_decoder, learnable_data, tmp_path):
    out = tmp_path / "o"
    args = ["--finetune_type", "lora", "--save_steps", "3", "--save_on_epoch_end", "0"]
    assert run_train(tiny_decoder, learnable_data, out, *args, "--max_steps", "3")[0] == 0
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"optimizer": Evil()}, out / "checkpoint-step-3" / "training_state.pt")
    code = run_train(tiny_decoder, learnable_data, out, *args, "--resume_from_checkpoint",
                     "latest")[0]
    assert code == 2 and not marker.exists()


def test_save_total_limit_keeps_the_newest_step_checkpoints(tiny_decoder, learnable_data,
                                                             tmp_path):
    out = tmp_path / "o"
    assert run_train(tiny_decoder, learnable_data, out, "--finetune_type", "lora",
                     "--save_steps", "2", "--save_total_limit", "2",
                     "--save_on_epoch_end", "0")[0] == 0
    assert sorted(p.name for p in out.glob("checkpoint-step-*")) == [
        "checkpoint-step-10", "checkpoint-step-12"]
    state = json.loads((out / "checkpoint-step-12" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 12 and state["state"]["samples"] == 48
