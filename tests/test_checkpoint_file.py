"""A training `.ckpt` straight into `memsparse-eval` (exported on the fly), and `memsparse-export CKPT DIR`."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from memsparse.eval import cli, harness

from memsparse.config import MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM
from memsparse.tokenizer import ByteTokenizer

module = pytest.importorskip("memsparse.train.module")
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    yield
    torch.set_num_threads(n)


def _tiny_model() -> MemSparseLM:
    torch.manual_seed(0)
    return MemSparseLM(ModelConfig(vocab_size=259, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64,
                                   block_size=8, segment=32, window=64, persistent_tokens=8,
                                   memory=MemoryConfig(heads=2, head_dim=8, chunk_size=32)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(a .ckpt as memsparse-train writes it, the same model's export directory)."""
    d = tmp_path_factory.mktemp("ckpt")
    model = _tiny_model()
    tok = ByteTokenizer()
    ckpt = d / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                module.CKPT_KEY: {"format": 1, "model_config": asdict(model.config),
                                  "tokenizer": module.tokenizer_payload(tok)}}, ckpt)
    export = d / "export"
    model.save_pretrained(export)
    tok.save(export)
    return ckpt, export


def _eval(checkpoint, out):
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", "--no-wandb", "--tasks", "passkey",
            "--lengths", "512", "--depths", "0.5", "--samples", "1"]
    assert cli.main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_eval_accepts_a_training_checkpoint(trained, tmp_path):
    ckpt, export = trained
    via_ckpt, via_dir = _eval(ckpt, tmp_path / "a"), _eval(export, tmp_path / "b")
    preds = [[s["prediction"] for s in c["samples"]] for c in via_ckpt["cells"]]
    assert preds == [[s["prediction"] for s in c["samples"]] for c in via_dir["cells"]] and preds[0]
    assert via_ckpt["meta"]["checkpoint"] == str(ckpt.resolve())
    assert via_ckpt["meta"]["tokenizer"] == str(ckpt.resolve())  # not the temporary export directory


def test_bad_checkpoint_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        cli.main(["--checkpoint", str(bad), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "cannot export training checkpoint" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_without_train_the_error_names_memsparse_export(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "memsparse.train.module", None)  # `import` of it raises ImportError
    with pytest.raises(harness.EvalInputError, match=r"memsparse-export .*last\.ckpt DIR"):
        harness.resolve_checkpoint(trained[0], export_dir=tmp_path / "x")


def _check_export(out, export):
    assert (out / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((export / "config.json").read_text())
    assert harness.resolve_checkpoint(out).tokenizer_source == str(out)


def test_memsparse_export(trained, tmp_path, capsys):
    """`memsparse-export CKPT DIR` through its entry point's function (the console script is installed and names
    it; running it as a process is the slow test below)."""
    from memsparse.train.export import main

    assert "from memsparse.train.export import main" in (BIN / "memsparse-export").read_text()
    ckpt, export = trained
    out = tmp_path / "exp"
    assert main([str(ckpt), str(out)]) == 0
    assert capsys.readouterr().out == f"exported {ckpt} to {out}\n"
    _check_export(out, export)


@pytest.mark.slow  # ~6 s, mostly the process's imports; the same main runs in-process above
def test_memsparse_export_console_script(trained, tmp_path):
    ckpt, export = trained
    out = tmp_path / "exp"
    r = subprocess.run([str(BIN / "memsparse-export"), str(ckpt), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    _check_export(out, export)



def test_memsparse_export_bad_input_is_one_line(tmp_path, capsys):
    from memsparse.train.export import main

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\0" * 100)
    for path in (tmp_path / "nowhere.ckpt", bad):
        with pytest.raises(SystemExit) as e:
            main([str(path), str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and path.name in err, err
        assert not (tmp_path / "e").exists()
