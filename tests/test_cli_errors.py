"""memsparse-train's answer to a user's mistake: exit status 2 and one line naming the key or file and what is
allowed (a second line for parse errors: a suggestion and where the keys are listed), no traceback and no usage
text; `--debug` or MEMSPARSE_DEBUG=1 brings the traceback back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lightning")

from memsparse.train.cli import main  # noqa: E402

BIN = Path(sys.executable).parent
from cli_config import reused_parser  # noqa: E402  (tests/ is on sys.path: conftest.py)
from tiny_recipe import tiny_model  # noqa: E402

TINY_MODEL = tiny_model()


def recipe(root: Path, **data) -> Path:
    """A tiny CPU recipe (no logger, no validation) under `root`; `data` overrides keys of `data:`."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2, "logger": False,
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(root / "run")},
        "model": {"config": TINY_MODEL, "lr": 3e-3, "warmup_steps": 1, "total_steps": 2, "min_lr": 3e-4},
        "data": {"stdlib_limit": 4, "tokenizer": "byte", "seq_len": 64, "batch_size": 2, "val_fraction": 0.0,
                 **data},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    monkeypatch.delenv("MEMSPARSE_DEBUG", raising=False)


def _setup(case: str, tmp: Path) -> list[str]:
    """The command line of one mistake (files it needs written under `tmp`)."""
    cfg = str(recipe(tmp))
    if case == "negative_lr":
        return ["fit", "--config", cfg, "--model.lr", "-1"]
    if case == "min_lr_above_lr":
        return ["fit", "--config", cfg, "--model.min_lr", "0.1"]
    if case == "seq_len_0":
        return ["fit", "--config", cfg, "--data.seq_len", "0"]
    if case == "unknown_variant":
        return ["fit", "--config", cfg, "--model.config.variant", "titan"]
    if case == "window_0":
        return ["fit", "--config", cfg, "--model.config.window", "0"]
    if case == "memory_heads_0":
        return ["fit", "--config", cfg, "--model.config.memory.heads", "0"]
    if case == "unknown_task":
        return ["fit", "--config", cfg, "--data.synthetic", "[{task: nope, proportion: 0.5}]"]
    if case == "seq_len_below_synthetic_lengths":
        cfg = str(recipe(tmp, synthetic=[{"task": "passkey", "proportion": 0.5, "lengths": [64]}]))
        return ["fit", "--config", cfg, "--data.seq_len", "48"]
    if case == "synthetic_length_below_the_prompt":
        cfg = str(recipe(tmp, synthetic=[{"task": "passkey", "proportion": 0.5, "lengths": [64]}]))
        return ["fit", "--config", cfg]
    if case == "missing_data_path":
        return ["fit", "--config", cfg, "--data.files", f"[{tmp / 'nope' / 'corpus.jsonl'}]"]
    if case == "empty_data_dir":
        (tmp / "empty").mkdir()
        return ["fit", "--config", cfg, "--data.files", f"[{tmp / 'empty'}]"]
    if case == "wrong_text_field":
        (tmp / "c.jsonl").write_text(json.dumps({"content": "some text"}) + "\n")
        return ["fit", "--config", cfg, "--data.files", f"[{tmp / 'c.jsonl'}]"]
    if case == "too_little_data":
        (tmp / "small.txt").write_text("just a few words\n")
        return ["fit", "--config", cfg, "--data.files", f"[{tmp / 'small.txt'}]"]
    if case == "missing_ckpt_path":
        return ["fit", "--config", cfg, "--ckpt_path", str(tmp / "run" / "checkpoints" / "nope.ckpt")]
    if case == "ckpt_path_last_without_checkpoint":
        return ["fit", "--config", cfg, "--ckpt_path", "last"]
    if case == "truncated_ckpt":
        import torch

        buf = tmp / "full.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(4096)}, "hyper_parameters": {}}, buf)
        data = buf.read_bytes()
        (tmp / "truncated.ckpt").write_bytes(data[: len(data) // 2])
        return ["fit", "--config", cfg, "--ckpt_path", str(tmp / "truncated.ckpt")]
    if case == "yaml_syntax_error":
        (tmp / "bad.yaml").write_text("trainer:\n  max_steps: [1, 2\nmodel: {}\n")
        return ["fit", "--config", str(tmp / "bad.yaml")]
    if case == "unknown_key_in_yaml":
        data = yaml.safe_load(Path(cfg).read_text())
        data["trainer"]["max_stepz"] = 3
        Path(cfg).write_text(yaml.safe_dump(data))
        return ["fit", "--config", cfg]
    if case == "unknown_option":
        return ["fit", "--config", cfg, "--model.config.dimm", "64"]
    if case == "missing_config_file":
        return ["fit", "--config", str(tmp / "nope.yaml")]
    raise AssertionError(case)


CASES = {  # case: what the one line must say
    "negative_lr": ["model.lr: must be > 0, got -1.0"],
    "min_lr_above_lr": ["model.min_lr: must be in [0, model.lr=0.003], got 0.1"],
    "seq_len_0": ["data.seq_len: must be an integer >= 2, got 0"],
    "unknown_variant": ["model.config.variant: must be mac, mag or mal, got 'titan'"],
    "window_0": ["model.config.window: must be a positive integer, got 0"],
    "memory_heads_0": ["model.config.memory.heads: must be >= 1, got 0"],
    "unknown_task": ["data.synthetic[0].task: unknown task 'nope'; known tasks: ", "passkey"],
    "seq_len_below_synthetic_lengths": ["data.seq_len=48 is shorter than", "data.synthetic[0].lengths=[64]",
                                        "keep data.seq_len >= 64"],
    "synthetic_length_below_the_prompt": ["data.synthetic[0]", "lengths [64] are too short; it needs at least"],
    "missing_data_path": ["data.files: no data file matches", "corpus.jsonl"],
    "empty_data_dir": ["data.files: the directory", "holds no data file (files ending in .txt"],
    "wrong_text_field": ["data.text_field 'text' is not a column of", "columns: ['content']"],
    "too_little_data": ["too little training data", "fewer than data.batch_size=2", "lower data.batch_size"],
    "missing_ckpt_path": ["--ckpt_path ", "nope.ckpt: no such file"],
    "ckpt_path_last_without_checkpoint": ["--ckpt_path last: no last.ckpt in ", "nothing to resume"],
    "truncated_ckpt": ["cannot read checkpoint ", "truncated.ckpt: truncated, corrupted or not a torch checkpoint"],
    "yaml_syntax_error": ["bad.yaml:3:6: YAML syntax error: while parsing a flow sequence"],
    "unknown_key_in_yaml": ["does not accept option 'trainer.max_stepz'", "did you mean --trainer.max_steps"],
    "unknown_option": ["unrecognized arguments: --model.config.dimm 64", "did you mean --model.config.dim"],
    "missing_config_file": ["--config ", "nope.yaml: no such file"],
}
# found after other output: datasets' progress bar while it reads the file, Lightning's device lines
OTHER_OUTPUT_FIRST = {"wrong_text_field", "too_little_data"}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line_and_exit_2(case, tmp_path, capsys):
    argv = _setup(case, tmp_path)
    with reused_parser(), pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case not in OTHER_OUTPUT_FIRST:
        assert len(lines) <= 2, err  # nothing else was printed
    errors = [ln for ln in lines if ln.startswith("memsparse-train: error: ")]
    assert len(errors) == 1, err
    text = " ".join(lines[lines.index(errors[0]):])
    for part in CASES[case]:
        assert part in text, (part, err)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training


def test_a_data_mistake_creates_no_wandb_run(tmp_path, capsys, monkeypatch):
    """Lightning creates the W&B run before the datamodule's setup; a single-process fit builds its datasets
    first, so a synthetic length too short for its prompt is the only output and leaves no run directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = recipe(tmp_path, synthetic=[{"task": "passkey", "proportion": 0.5, "lengths": [64]}])
    data = yaml.safe_load(cfg.read_text())
    del data["trainer"]["logger"]  # the CLI's default: W&B
    cfg.write_text(yaml.safe_dump(data))
    with reused_parser(), pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "are too short" in err, err
    assert not (tmp_path / "run" / "wandb").exists() and not list(tmp_path.rglob("wandb"))


def test_debug_brings_the_traceback_back(tmp_path, monkeypatch):
    from memsparse.config import ConfigError

    monkeypatch.setenv("MEMSPARSE_DEBUG", "")  # restored after the test: --debug sets it to 1
    argv = ["fit", "--config", str(recipe(tmp_path)), "--model.lr", "-1"]
    with reused_parser():
        with pytest.raises(ConfigError, match="model.lr: must be > 0"):
            main([*argv, "--debug"])
        with pytest.raises(ConfigError, match="model.lr: must be > 0"):
            main(argv)  # --debug set MEMSPARSE_DEBUG=1 for the processes a run launches
        monkeypatch.setenv("MEMSPARSE_DEBUG", "0")
        with pytest.raises(SystemExit):
            main(argv)


def test_console_script(tmp_path):
    """As a user runs it: a value error is one line on stderr and exit 2 (the in-process cases above go through the
    same `main`)."""
    cfg = str(recipe(tmp_path))
    env = {**os.environ, "WANDB_MODE": "offline", "MEMSPARSE_DEBUG": ""}
    r = subprocess.run([str(BIN / "memsparse-train"), "fit", "--config", cfg, "--model.config.variant", "titan"],
                       cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr == "memsparse-train: error: model.config.variant: must be mac, mag or mal, got 'titan'\n"
