"""Run hygiene of memsparse-train: a fresh fit refuses a directory that holds an earlier run (resume it or
--overwrite), `--ckpt_path last` resumes this run's last.ckpt; a resumed fit continues the W&B run, adds to
phase_times.json and shows a progress bar counted from the checkpoint; the first Ctrl-C or a SIGTERM saves last.ckpt
at the end of the current step and stops (a second Ctrl-C stops at once), and says how to resume. And
memsparse-eval's token-level bar inside long samples (on a terminal only)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
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


class SendSignal(pl.Callback):
    """Test only: the process sends itself `signum` (`times` times) in the first batch of the training step that
    ends at global step `at_step` (as a user's Ctrl-C or a cluster's SIGTERM arrives while a step runs). Given on the
    command line as `--trainer.callbacks+=test_run_hygiene.SendSignal` (tests/ on the path)."""

    def __init__(self, signum: str = "SIGINT", at_step: int = 3, times: int = 1) -> None:
        self.signum, self.at_step, self.times = getattr(signal, signum), at_step, times
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step - 1 and not self.sent:  # the first batch of the step
            self.sent = True
            for _ in range(self.times):
                signal.raise_signal(self.signum)  # its Python handler runs before this returns


def send_signal(signum: str, at_step: int, times: int = 1) -> list[str]:
    return ["--trainer.callbacks+=test_run_hygiene.SendSignal", f"--trainer.callbacks.signum={signum}",
            f"--trainer.callbacks.at_step={at_step}", f"--trainer.callbacks.times={times}"]


@pytest.fixture
def sigint_handler():
    """The test process's SIGINT handler, put back after the test (Lightning's KeyboardInterrupt path ignores SIGINT
    from then on)."""
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


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
@pytest.mark.parametrize("signum,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_saves_and_says_how_to_resume(tmp_path, signum, code):
    """As a user or a cluster does it: Ctrl-C (SIGINT) or SIGTERM from outside, once training runs -> last.ckpt of
    the step it stopped at (no periodic one is due), exit 130 or 143 and the command that resumes the run (about
    20 s each: a console script that trains until its first metrics are on disk)."""
    cfg = str(recipe(tmp_path, max_steps=100000, logger=False))
    logs = tmp_path / "logs"
    args = ["fit", "--config", cfg, "--model.total_steps", "100000", "--last_checkpoint.every_n_train_steps", "100000",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs),
            "--trainer.logger.flush_logs_every_n_steps", "1"]
    env = {**os.environ, "WANDB_MODE": "offline", "MEMSPARSE_DEBUG": ""}
    proc = subprocess.Popen([str(BIN / "memsparse-train"), *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 120
        while not list(logs.glob("**/metrics.csv")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert list(logs.glob("**/metrics.csv")), proc.communicate(timeout=30)
        proc.send_signal(getattr(signal, signum))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert ("memsparse-train: Ctrl-C: stopping after this step" in err) == (signum == "SIGINT"), err[-3000:]
    step = load_checkpoint(last)["global_step"]
    by = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}[signum]
    assert step >= 1 and f"memsparse-train: interrupted at step {step} ({by}); the last checkpoint is {last} " \
        f"(step {step}). Resume with:" in err, err[-3000:]
    cmd = next(ln.strip() for ln in err.splitlines() if ln.strip().startswith("memsparse-train fit"))
    assert cmd == " ".join(["memsparse-train", *args, "--ckpt_path", str(last)])
    assert "Traceback" not in err


def logged(root: Path) -> list[tuple[int, str, float]]:
    """(step, key, value) of train/loss and val/loss over the CSV logs of all invocations of a run."""
    rows = [r for f in sorted(root.glob("**/metrics.csv")) for r in csv.DictReader(f.open())]
    return [(int(r["step"]), k, float(r[k])) for r in rows for k in ("train/loss", "val/loss") if r.get(k)]


def weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "run" / "export" / "model.safetensors")


@pytest.mark.parametrize("at_step", [3, 4], ids=["between-validations", "validation-due"])
def test_ctrl_c_saves_the_current_step_and_stops(tmp_path, capsys, sigint_handler, at_step):
    """The first Ctrl-C, during a step of 6 with no periodic checkpoint due, lets the step finish, saves last.ckpt of
    that step and exits 130 with the command that resumes; resumed, the run reaches step 6 with the same weights, and
    the same losses logged (validation every 2 steps: none added for the stop, the one due at step 4 kept), as one
    never interrupted. The SIGINT handler of before the fit is back after it."""
    def args(root: Path) -> list[str]:
        cfg = recipe(root, max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2,
                     logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}})
        return ["fit", "--config", str(cfg), "--data.val_fraction", "0.3", "--last_checkpoint.every_n_train_steps",
                "1000"]

    stopped, full = tmp_path / "stopped", tmp_path / "full"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        main([*args(stopped), *send_signal("SIGINT", at_step)])
    err = capsys.readouterr().err
    last = stopped / "run" / "checkpoints" / "last.ckpt"
    assert e.value.code == 130, err[-3000:]
    assert err.count("memsparse-train: Ctrl-C: stopping after this step and saving last.ckpt (Ctrl-C again") == 1
    assert (f"memsparse-train: interrupted at step {at_step} (Ctrl-C); the last checkpoint is {last} "
            f"(step {at_step})") in err
    assert "Resume with:" in err and "Traceback" not in err, err[-3000:]
    assert load_checkpoint(last)["global_step"] == at_step
    assert signal.getsignal(signal.SIGINT) is before
    assert json.loads((stopped / "run" / "phase_times.json").read_text())["ended_by"] == "SIGINT"

    main([*args(stopped), "--ckpt_path", "last"])
    assert load_checkpoint(last)["global_step"] == 6
    main(args(full))
    a, b = weights(full), weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged(full) == logged(stopped) and sum(k == "val/loss" for _, k, _ in logged(full)) == 3


def test_sigterm_saves_the_current_step_and_stops(tmp_path, capsys):
    """SIGTERM (a cluster's preemption) in the first of the two accumulated batches of step 2: the step ends (Lightning
    alone would stop before its optimizer step), last.ckpt of step 2, exit 143 with the resume command and no
    traceback; the resumed run reaches max_steps with the weights of one never stopped."""
    def args(root: Path) -> list[str]:
        return ["fit", "--config", str(recipe(root, max_steps=4, logger=False, accumulate_grad_batches=2)),
                "--last_checkpoint.every_n_train_steps", "1000"]

    stopped, full = tmp_path / "stopped", tmp_path / "full"
    with pytest.raises(SystemExit) as e:
        main([*args(stopped), *send_signal("SIGTERM", 2)])
    err = capsys.readouterr().err
    last = stopped / "run" / "checkpoints" / "last.ckpt"
    assert e.value.code == 143, err[-3000:]
    assert f"memsparse-train: interrupted at step 2 (SIGTERM); the last checkpoint is {last} (step 2)" in err
    assert "Traceback" not in err
    assert load_checkpoint(last)["global_step"] == 2
    assert json.loads((stopped / "run" / "phase_times.json").read_text())["ended_by"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # Lightning's handler gone with the fit

    main([*args(stopped), "--ckpt_path", "last"])
    assert load_checkpoint(last)["global_step"] == 4
    main(args(full))
    a, b = weights(full), weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_ctrl_c_stops_at_once_without_saving(tmp_path, capsys, sigint_handler):
    """Two Ctrl-C during step 3: the second stops at once, so last.ckpt is still the periodic one of step 2, exit
    130; and after a fit that ended normally, the SIGINT handler of before the fit is back."""
    cfg = str(recipe(tmp_path, max_steps=6, logger=False))
    args = ["fit", "--config", cfg, "--last_checkpoint.every_n_train_steps", "2"]
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        main([*args, *send_signal("SIGINT", 3, times=2)])
    err = capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert e.value.code == 130, err[-3000:]
    assert "memsparse-train: Ctrl-C: stopping after this step" in err  # the first one
    assert "interrupted at step 2 (Ctrl-C); the last checkpoint is" in err and f"{last} (step 2)" in err, err[-3000:]
    assert load_checkpoint(last)["global_step"] == 2

    signal.signal(signal.SIGINT, before)  # Lightning's interrupt path left SIGINT ignored
    main([*args, "--ckpt_path", "last"])
    assert load_checkpoint(last)["global_step"] == 6
    assert signal.getsignal(signal.SIGINT) is before


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
