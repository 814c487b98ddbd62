"""benchmarks/key_exposure.py replays a stage's rows in the order the trainer's loader deals them."""

from __future__ import annotations

import pytest
import yaml
from load_script import load_benchmark
from memsparse.train.data import MemSparseDataModule

key_exposure = load_benchmark("key_exposure")

MINI = {"trainer": {"max_steps": 7},
        "data": {"tokenizer": "byte", "seq_len": 512, "batch_size": 3, "synthetic_samples": 16, "seed": 3,
                 "synthetic": [{"task": "passkey_balanced", "proportion": 0.5, "lengths": [512]},
                               {"task": "niah_single", "proportion": 0.5, "lengths": [512]}]}}


def loader_answers(data: dict, steps: int) -> list[tuple[int, str]]:
    """(step, answer) of the passkey rows the training loader itself yields, epoch after epoch."""
    dm = MemSparseDataModule(**data)
    dm.setup("fit")
    loader = dm.build_train_loader(rank=0, world_size=1)
    passkey_part = 1  # source 0 is the (empty) text part: parts are numbered text first, then the tasks in order
    out, step, epoch = [], 0, 0
    while step < steps:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if step >= steps:
                break
            for row in range(batch["labels"].shape[0]):
                if int(batch["source"][row]) != passkey_part:
                    continue
                lab = batch["labels"][row]
                ids = [t for t in lab[lab != -100].tolist() if t != dm.tokenizer.eos_id]
                out.append((step, dm.tokenizer.decode(ids).strip()))
            step += 1
        epoch += 1
    return out


def test_replay_matches_the_training_loader_across_epochs(tmp_path):
    want = loader_answers(dict(MINI["data"]), 7)  # 16 samples, 5 batches an epoch: step 5 is epoch 1's first
    got = [(s, a) for s, t, a in key_exposure.stage_answers(dict(MINI["data"]), str(tmp_path), 7)]
    assert got == want and len(want) >= 5 and all(a.isdigit() and len(a) == 5 for _, a in want)


def test_main_counts_the_asked_keys_and_writes_json(tmp_path, capsys):
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump(MINI))
    tok = tmp_path / "tok"
    tok.mkdir()
    first = loader_answers(dict(MINI["data"]), 7)[0][1]
    out = key_exposure.main(["--tokenizer", str(tok), "--config", str(cfg), "--keys", f"{first},10000",
                             "--out", str(tmp_path / "x.json")])
    assert out["steps"] == 7 and out["keys"][first]["rows"] >= 1 and out["keys"]["10000"]["rows"] == 0
    assert (tmp_path / "x.json").exists() and f"{first}: " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a directory"):
        key_exposure.main(["--tokenizer", str(tmp_path / "missing"), "--config", str(cfg)])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  no_such_setting: 1\n")
    with pytest.raises(SystemExit, match="does not resolve"):
        key_exposure.main(["--tokenizer", str(tok), "--config", str(bad)])
