"""`memsparse-train test` (loss/perplexity on a held-out test split fit never saw) and `memsparse-train predict`
(continuations of prompts from a file, written as JSON lines), on a tiny CPU run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lightning")

from cli_config import reused_parser  # noqa: E402  (tests/ is on sys.path: conftest.py)
from memsparse.train.cli import cli, main  # noqa: E402
from memsparse.train.data import MemSparseDataModule, read_prompts  # noqa: E402
from tiny_recipe import tiny_model  # noqa: E402

from memsparse.model import MemSparseLM  # noqa: E402

TINY_MODEL = tiny_model()


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    with reused_parser():  # the CLI's parser built once per process (tests/cli_config.py)
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step fit on 8 text files with a test split (test_fraction 0.25)."""
    root = tmp_path_factory.mktemp("run")
    for i in range(8):
        (root / f"d{i}.txt").write_text("".join(f"document {i} line {j}: the quick brown fox\n" for j in range(8)))
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2, "logger": False,
                    "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(root)},
        "model": {"config": TINY_MODEL, "lr": 3e-3, "warmup_steps": 1, "total_steps": 2},
        "data": {"files": [str(root / "*.txt")], "tokenizer": "byte", "seq_len": 64, "batch_size": 2,
                 "val_fraction": 0.0, "test_fraction": 0.25},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    with reused_parser():
        main(["fit", "--config", str(root / "run.yaml")])
    return root


def _ckpt(run: Path) -> str:
    return str(run / "checkpoints" / "last.ckpt")


def test_test_split_is_held_out_and_evaluated(run):
    dm = MemSparseDataModule(files=[str(run / "*.txt")], seq_len=64, val_fraction=0.0, test_fraction=0.25)
    train, _ = dm.documents()
    assert dm._test_docs and not set(dm._test_docs) & set(train)  # fit never sees the test documents
    c = cli(["test", "--config", str(run / "run.yaml"), "--ckpt_path", _ckpt(run)])
    m = c.trainer.callback_metrics
    assert math.isfinite(float(m["test/loss"])) and float(m["test/loss"]) > 0
    assert float(m["test/ppl"]) == pytest.approx(math.exp(float(m["test/loss"])), rel=1e-4)
    assert float(m["test/loss/text"]) == pytest.approx(float(m["test/loss"]), rel=1e-5)  # text only


def test_test_loss_per_source(run):
    """A text + passkey test split: the per-source losses, weighted by their tokens, give the overall loss."""
    spec = '[{"task": "passkey", "proportion": 0.5, "lengths": [256]}]'
    c = cli(["test", "--config", str(run / "run.yaml"), "--ckpt_path", _ckpt(run), "--data.seq_len", "256",
             "--data.synthetic", spec, "--data.synthetic_loss", "all"])
    m = {k: float(v) for k, v in c.trainer.callback_metrics.items()}
    assert {"test/loss/text", "test/loss/passkey", "test/ppl/passkey"} <= set(m)
    assert m["test/loss/text"] != pytest.approx(m["test/loss/passkey"], rel=1e-3)
    lo, hi = sorted((m["test/loss/text"], m["test/loss/passkey"]))
    assert lo < m["test/loss"] < hi
    assert m["test/ppl/passkey"] == pytest.approx(math.exp(m["test/loss/passkey"]), rel=1e-4)


@pytest.mark.parametrize("extra,message", [
    (["--data.test_fraction", "0"], "set data.test_fraction"),
    ([], "needs trained weights: pass --ckpt_path"),
])
def test_test_errors_are_one_line(run, capsys, extra, message):
    args = ["test", "--config", str(run / "run.yaml"), *extra]
    if "--data.test_fraction" in extra:
        args += ["--ckpt_path", _ckpt(run)]
    with reused_parser(), pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err


def test_predict_writes_continuations(run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "document 3 line"}) + "\n\n" + json.dumps({"prompt": "the"}) + "\n")
    out = tmp_path / "pred.jsonl"
    main(["predict", "--config", str(run / "run.yaml"), "--ckpt_path", _ckpt(run), "--data.predict_file",
          str(prompts), "--data.predict_output", str(out), "--data.predict_max_new_tokens", "5"])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["document 3 line", "the"] and [r["index"] for r in recs] == [0, 1]
    # greedy: the same as generating from the exported model directly, after the end-of-text token
    model = MemSparseLM.from_pretrained(run / "export").eval()
    from memsparse.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    for r in recs:
        ids, _ = model.generate(torch.tensor([[tok.eos_id, *tok.encode(r["prompt"])]]), 5, eos_id=tok.eos_id)
        new = ids[0].tolist()
        new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
        assert r["completion"] == tok.decode(new) and r["completion_tokens"] == len(new) <= 5
        assert r["prompt_tokens"] == len(tok.encode(r["prompt"]))


def test_prompts_file_formats_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  \nsecond\\nline\n")
    assert read_prompts(str(txt)) == ["first", "second\nline"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "x"}\n')
    for path, message in ((None, "set data.predict_file"), (str(tmp_path / "none.txt"), "does not exist"),
                          (str(bad), 'p.jsonl:1: expected an object with a "prompt"')):
        with pytest.raises(ValueError, match=message):
            read_prompts(path)


def test_single_document_test_split_is_its_last_tokens(tmp_path):
    text = "".join(f"line {i} of one file\n" for i in range(50))
    (tmp_path / "one.txt").write_text(text)
    dm = MemSparseDataModule(files=[str(tmp_path / "one.txt")], seq_len=16, val_fraction=0.1, test_fraction=0.2)
    dm.setup("fit")
    full = list(text.encode()) + [dm.tokenizer.eos_id]
    train, val, test = (d.parts[0].stream.tolist() for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset))
    assert train + val + test == full and len(test) == round(0.2 * len(full))
    assert len(val) == round(0.1 * (len(full) - len(test)))


def test_predict_without_prompts_is_one_line(run, capsys):
    with reused_parser(), pytest.raises(SystemExit) as e:
        main(["predict", "--config", str(run / "run.yaml"), "--ckpt_path", _ckpt(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("memsparse-train: error: memsparse-train predict needs prompts: "
                                                   "set data.predict_file")


# ~8 s, mostly the process's imports: the same `main` runs in-process above, and test_cli_errors.py's
# test_console_script runs memsparse-train as a process in the default run
@pytest.mark.slow
def test_predict_console_script_without_prompts(run):
    """As a user runs it: exit 2 and one line naming the key."""
    import os
    import subprocess

    exe = Path(sys.executable).parent / "memsparse-train"
    r = subprocess.run([str(exe), "predict", "--config", str(run / "run.yaml"), "--ckpt_path", _ckpt(run)],
                       capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("memsparse-train: error: memsparse-train predict needs "
                                                        "prompts: set data.predict_file")
