"""InitFromWeights: a fit that starts from another run's weights (a curriculum stage)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from memsparse.train.cli import main  # noqa: E402
from memsparse.train.init_from import InitFromWeights  # noqa: E402

from memsparse.model import MemSparseLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from cli_config import reused_parser  # noqa: E402
from test_train import tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    with reused_parser():  # the CLI's parser built once per process (tests/cli_config.py)
        yield


def test_second_stage_starts_from_the_first_stages_weights(tmp_path):
    a = tmp_path / "a"
    main(["fit", "--config", str(tiny_config(a, **{"trainer.max_steps": 3}))])
    first = MemSparseLM.from_pretrained(a / "export")
    b = tmp_path / "b"
    # stage 2: other sequence length, a window shrunk to one segment of 16 (weights do not depend on either) and a
    # zero learning rate, so its final weights are its starting weights
    cfg = tiny_config(b, **{"trainer.max_steps": 2, "data.seq_len": 64, "data.tokenizer": str(a / "export"),
                            "model.config.window": 16, "model.config.segment": 16,
                            "model.lr": 1e-12, "model.min_lr": 1e-12,
                            "trainer.callbacks": [{"class_path": "memsparse.train.init_from.InitFromWeights",
                                                   "init_args": {"path": str(a / "export")}}]})
    main(["fit", "--config", str(cfg)])
    second = MemSparseLM.from_pretrained(b / "export")
    fresh = tmp_path / "c"
    main(["fit", "--config", str(tiny_config(fresh, **{"trainer.max_steps": 2, "model.lr": 1e-12,
                                                        "model.min_lr": 1e-12, "seed_everything": 5}))])
    other = MemSparseLM.from_pretrained(fresh / "export")
    sd1, sd2, sd3 = first.state_dict(), second.state_dict(), other.state_dict()
    for k in sd1:
        torch.testing.assert_close(sd2[k], sd1[k], rtol=0, atol=1e-6)
    assert any((sd3[k] - sd1[k]).abs().max() > 1e-3 for k in sd1)  # without the callback: other weights


def test_init_from_a_ckpt_and_architecture_mismatch(tmp_path, capsys):
    a = tmp_path / "a"
    main(["fit", "--config", str(tiny_config(a, **{"trainer.max_steps": 2}))])
    ckpt = a / "checkpoints" / "last.ckpt"
    b = tmp_path / "b"
    cfg = tiny_config(b, **{"trainer.max_steps": 1, "model.config.dim": 48,
                            "trainer.callbacks": [{"class_path": "memsparse.train.init_from.InitFromWeights",
                                                   "init_args": {"path": str(ckpt)}}]})
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    assert e.value.code == 2 and re.search("different architecture.*dim", capsys.readouterr().err)
    with pytest.raises(FileNotFoundError, match="no export directory"):
        InitFromWeights(str(tmp_path / "missing"))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("main_recipe,ablation", [("retrieval_small_copy", "ablation_retrieval_no_memory_copy"),
                                                  ("retrieval_small", "ablation_retrieval_no_memory"),
                                                  ("retrieval_small_long", "ablation_retrieval_no_memory_long")])
def test_retrieval_ablation_differs_only_in_the_memory(main_recipe, ablation):
    import yaml

    recipes = Path(__file__).parent.parent / "recipes"
    a = _flat(yaml.safe_load((recipes / f"{main_recipe}.yaml").read_text()))
    b = _flat(yaml.safe_load((recipes / f"{ablation}.yaml").read_text()))
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    allowed = {"model.config.memory_layers", "trainer.default_root_dir", "trainer.callbacks", "data.tokenizer_dir"}
    assert differ <= allowed, differ
    assert b["model.config.memory_layers"] == [] and a["model.config.memory_layers"]
    if "trainer.callbacks" in differ:  # only the stage-1 path of InitFromWeights
        ca, cb = a["trainer.callbacks"], b["trainer.callbacks"]
        assert [c["class_path"] for c in ca] == [c["class_path"] for c in cb]
        assert [c for c in ca if "InitFromWeights" not in c["class_path"]] == \
            [c for c in cb if "InitFromWeights" not in c["class_path"]]


def test_stage_two_starts_from_stage_one():
    import yaml

    recipes = Path(__file__).parent.parent / "recipes"
    for stage1, stage2 in (("retrieval_small_copy", "retrieval_small"),
                           ("ablation_retrieval_no_memory_copy", "ablation_retrieval_no_memory"),
                           ("retrieval_small", "retrieval_small_long"),
                           ("ablation_retrieval_no_memory", "ablation_retrieval_no_memory_long")):
        s1 = yaml.safe_load((recipes / f"{stage1}.yaml").read_text())
        s2 = yaml.safe_load((recipes / f"{stage2}.yaml").read_text())
        root = s1["trainer"]["default_root_dir"]
        init = [c for c in s2["trainer"]["callbacks"] if c["class_path"].endswith("InitFromWeights")]
        assert init and init[0]["init_args"]["path"] == f"{root}/export"
        # the chain's first stage trains the BPE; later stages reuse it
        assert s2["data"]["tokenizer_dir"] == s1["data"].get("tokenizer_dir", f"{root}/tokenizer")
        assert s1["model"]["config"] == s2["model"]["config"]  # InitFromWeights needs the same architecture
