"""Run hygiene of memsparse-train: a fresh fit refuses a directory that holds an earlier run (resume it or
--overwrite), `--ckpt_path last` resumes this run's last.ckpt; a resumed fit continues the W&B run, adds to
phase_times.json and shows a progress bar counted from the checkpoint; Ctrl-C says how to resume. And
memsparse-eval's token-level bar inside long samples (on a terminal only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lightning")

from memsparse.train.cli import main  # noqa: E402
from memsparse.train.module import load_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent
from cli_config import reused_parser  # noqa: E402  (tests/ is on sys.path: conftest.py)
from tiny_recipe import tiny_model  # noqa: E402

TINY_MODEL = tiny_model()


def recipe(root: Path, **trainer) -> Path:
    """A tiny CPU recipe whose run directory is `root/run` (the default W&B logger, offline)."""
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2,
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, "default_root_dir": str(root / "run"), **trainer},
        "model": {"config": TINY_MODEL, "lr": 3e-3, "warmup_steps": 1, "min_lr": 3e-4},
        "data": {"stdlib_limit": 4, "tokenizer": "byte", "seq_len": 64, "batch_size": 2, "val_fraction": 0.0},
        "last_checkpoint": {"every_n_train_steps": 1},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MEMSPARSE_DEBUG", raising=False)
    with reused_parser():  # the CLI's parser built once per process (tests/cli_config.py)
        yield


def test_fresh_fit_refuses_an_earlier_run_resume_continues_it(tmp_path, capsys):
    cfg = str(recipe(tmp_path))
    run = tmp_path / "run"
    main(["fit", "--config", cfg])
    run_id = (run / "wandb_run_id").read_text().strip()
    assert "segments" not in json.loads((run / "phase_times.json").read_text())
    capsys.readouterr()

    # the same command again: refused (it would write last-v1.ckpt beside the old run's last.ckpt)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", cfg])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "already holds a run" in err and "--ckpt_path last" in err and "--overwrite" in err

    # resumed: the same W&B run, phase_times.json added to, the bar counted from the checkpoint's batch
    main(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", "4",
          "--trainer.enable_progress_bar", "true"])
    out = capsys.readouterr()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert (run / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)
    times = json.loads((run / "phase_times.json").read_text())
    assert times["global_step"] == 4 and [s["start_step"] for s in times["segments"]] == [0, 2]
    assert [s["global_step"] for s in times["segments"]] == [2, 4]
    assert times["fit_s"] == pytest.approx(sum(s["fit_s"] for s in times["segments"]))
    bars = [ln for ln in (out.out + out.err).replace("\r", "\n").splitlines() if ln.startswith("Epoch 0:")]
    assert bars[0].startswith("Epoch 0:  50%|") and "| 2/4 [" in bars[0], bars  # starts at the checkpoint's batch
    assert "| 4/4 [" in bars[-1] and not any("/?" in ln for ln in bars), bars

    # --overwrite: a fresh run there (the old checkpoints deleted; phase_times.json starts again)
    main(["fit", "--config", cfg, "--overwrite", "true", "--trainer.max_steps", "1", "--trainer.logger", "false"])
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert "segments" not in json.loads((run / "phase_times.json").read_text())


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path):
    """As a user runs it: SIGINT in the training loop -> exit 130 and the command that resumes the run (about 10 s:
    a console script that trains until its first checkpoint)."""
    cfg = str(recipe(tmp_path, max_steps=100000, logger=False))
    args = ["fit", "--config", cfg, "--model.total_steps", "100000"]
    env = {**os.environ, "WANDB_MODE": "offline", "MEMSPARSE_DEBUG": ""}
    proc = subprocess.Popen([str(BIN / "memsparse-train"), *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 120
        while not last.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert last.is_file(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "memsparse-train: interrupted at step" in err and "Resume with:" in err, err[-3000:]
    cmd = next(ln.strip() for ln in err.splitlines() if ln.strip().startswith("memsparse-train fit"))
    assert cmd == f"memsparse-train fit --config {cfg} --model.total_steps 100000 --ckpt_path {last}"
    assert "Traceback" not in err


def test_eval_shows_a_token_bar_inside_long_samples_on_a_terminal(tmp_path, monkeypatch):
    """memsparse-eval on a terminal (a pseudo-terminal here): a second bar counts the prompt tokens of each sample
    at least --token-progress long; off when stderr is not a terminal."""
    import fcntl
    import pty
    import struct
    import termios

    import torch
    from memsparse.eval import cli as eval_cli

    from memsparse.config import MemoryConfig, ModelConfig
    from memsparse.model import MemSparseLM
    from memsparse.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    MemSparseLM(ModelConfig(vocab_size=259, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64,
                            block_size=8, segment=32, window=64, persistent_tokens=8,
                            memory=MemoryConfig(heads=2, head_dim=8, chunk_size=32))).save_pretrained(ckpt)
    ByteTokenizer().save(ckpt)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing at width 0
    cmd = [str(BIN / "memsparse-eval"), "--checkpoint", str(ckpt), "--tasks", "passkey", "--lengths", "256,1k",
           "--depths", "0.5", "--out", str(tmp_path / "out"), "--no-wandb", "--device", "cpu", "--threads", "1",
           "--token-progress", "1k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "WANDB_MODE": "offline"})
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    proc.wait(timeout=120)
    text = screen.decode(errors="replace").replace("\r", "\n")
    assert proc.returncode == 0, text[-2000:]
    bars = [ln for ln in text.splitlines() if "prompt:" in ln]
    assert any("1.02k/1.02k" in ln for ln in bars), text[-2000:]  # the 1k sample: 1024 tokens counted
    assert not any("/256" in ln for ln in bars)  # the 256-token sample is below --token-progress

    import io

    class Args:
        progress, token_progress = True, "1k"

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal: no bar
    assert eval_cli.token_progress(Args) is None
