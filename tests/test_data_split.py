"""Validation from a single document: its last `val_fraction` of tokens are held out (or a one-line error)."""

import numpy as np
import pytest
from memsparse.train.data import DataConfigError, MemSparseDataModule, split_tokens

from memsparse.tokenizer import ByteTokenizer


def _dm(tmp_path, text, **kw):
    (tmp_path / "one.txt").write_text(text)
    kw = {"files": [str(tmp_path / "one.txt")], "seq_len": 16, "batch_size": 2,
          "tokenizer_dir": str(tmp_path / "tok"), **kw}
    dm = MemSparseDataModule(**kw)
    dm.setup("fit")
    return dm


def _stream(dataset) -> list[int]:
    """The token stream of a MixtureDataset's text part."""
    part = dataset.parts[0]
    return part.stream.tolist()


def test_single_file_holds_out_its_last_tokens(tmp_path):
    text = "".join(f"line {i} of the only file\n" for i in range(40))
    dm = _dm(tmp_path, text, val_fraction=0.25)
    assert dm.split_by_tokens
    full = list(text.encode()) + [ByteTokenizer().eos_id]
    train, val = _stream(dm.train_dataset), _stream(dm.val_dataset)
    assert train + val == full and len(val) == round(0.25 * len(full))
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (2, 16) and (batch["labels"] != -100).any()


def test_zero_fraction_means_no_validation(tmp_path):
    dm = _dm(tmp_path, "some text " * 20, val_fraction=0.0)
    assert dm.val_dataset is None and dm.val_dataloader() == []


def test_bpe_is_trained_before_the_cut(tmp_path):
    text = "".join(f"row {i}: alpha beta gamma\n" for i in range(60)) + "TAILONLY"
    dm = _dm(tmp_path, text, val_fraction=0.1, tokenizer="bpe", vocab_size=280)
    (tok_text,) = dm.tokenizer_documents()
    assert text.startswith(tok_text) and "TAILONLY" not in tok_text and len(tok_text) == round(0.9 * len(text))


def test_too_little_text_is_a_clear_error(tmp_path):
    with pytest.raises(DataConfigError, match="has 3 tokens: too few to hold out val_fraction=0.5"):
        _dm(tmp_path, "ab", val_fraction=0.5)
    with pytest.raises(DataConfigError):
        split_tokens(np.arange(3), 0.05)
    train, val = split_tokens(np.arange(100), 0.05)
    assert train.tolist() == list(range(95)) and val.tolist() == list(range(95, 100))


def test_cli_says_it_in_one_line(tmp_path, capsys, monkeypatch):
    """`memsparse-train fit` on a too-short single file: exit 2, one line, no traceback."""
    import sys

    from cli_config import reused_parser
    from memsparse.train.cli import main

    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    (tmp_path / "tiny.txt").write_text("hi")
    with reused_parser(), pytest.raises(SystemExit) as e:
        main(["fit", "--data.files", f"[{tmp_path / 'tiny.txt'}]", "--data.val_fraction", "0.5",
              "--trainer.accelerator", "cpu", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "too few to hold out" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("memsparse-train: error:")
