"""recipes/overlays/: each continues its base recipe from the base's own export and changes nothing else but the
step count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from cli_config import print_config  # noqa: E402  (tests/ is on sys.path: conftest.py)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
OVERLAYS = sorted((RECIPES / "overlays").glob("continue_*.yaml"))


def _resolved(capsys, *configs: Path) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    return print_config(args, capsys)


def test_there_are_overlays():
    assert {p.stem for p in OVERLAYS} >= {"continue_retrieval_small_long", "continue_ablation_retrieval_no_memory_long"}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.stem for p in OVERLAYS])
def test_overlay_continues_its_base_from_its_own_export(overlay, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    base = RECIPES / f"{overlay.stem.removeprefix('continue_')}.yaml"
    a = _resolved(capsys, base)
    b = _resolved(capsys, base, overlay)
    root = a["trainer"]["default_root_dir"]
    assert b["trainer"]["default_root_dir"] == f"{root}_more"
    init = [c for c in b["trainer"]["callbacks"] if c["class_path"].endswith("InitFromWeights")]
    assert len(init) == 1 and init[0]["init_args"]["path"] == f"{root}/export"
    others = lambda cfg: [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("InitFromWeights")]  # noqa: E731
    assert others(a) == others(b)
    assert b["trainer"]["max_steps"] == 1180  # the measured stage-4 run's steps (the stop is a step count)
    for cfg in (a, b):
        cfg["trainer"].pop("callbacks"), cfg["trainer"].pop("default_root_dir"), cfg["trainer"].pop("max_steps")
    assert a == b


BALANCED = {1: ["retrieval_small_copy", "ablation_retrieval_no_memory_copy"],
            2: ["retrieval_small", "ablation_retrieval_no_memory"],
            3: ["retrieval_small_long", "ablation_retrieval_no_memory_long"]}


@pytest.mark.parametrize("stage", sorted(BALANCED))
def test_balanced_keys_overlay_changes_only_the_passkey_task(stage, capsys, monkeypatch):
    """recipes/overlays/balanced_keys_stageN.yaml copies its stage's mixture: a recipe whose mixture changed
    without its overlay would train another mixture silently."""
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    overlay = RECIPES / "overlays" / f"balanced_keys_stage{stage}.yaml"
    for name in BALANCED[stage]:
        a = _resolved(capsys, RECIPES / f"{name}.yaml")
        b = _resolved(capsys, RECIPES / f"{name}.yaml", overlay)
        tasks = [s["task"] for s in b["data"]["synthetic"]]
        assert "passkey_balanced" in tasks and "passkey" not in tasks
        for s in b["data"]["synthetic"]:
            s["task"] = "passkey" if s["task"] == "passkey_balanced" else s["task"]
        assert a == b, name


@pytest.mark.parametrize("name", BALANCED[3])
def test_full_balance_overlay_is_the_balanced_stage_3_mixture_with_every_key_balanced(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    base = RECIPES / f"{name}.yaml"
    a = _resolved(capsys, base, RECIPES / "overlays" / "balanced_keys_stage3.yaml")
    b = _resolved(capsys, base, RECIPES / "overlays" / "balanced_keys_full_stage3.yaml")
    assert [s["task"] for s in b["data"]["synthetic"]][0] == "passkey_balanced_full"
    b["data"]["synthetic"][0]["task"] = "passkey_balanced"
    assert a == b


@pytest.mark.parametrize("name", BALANCED[3])
def test_near_overlay_is_the_full_balance_mixture_with_a_fifth_of_its_passkeys_just_before_the_question(
        name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    base = RECIPES / f"{name}.yaml"
    a = _resolved(capsys, base, RECIPES / "overlays" / "balanced_keys_full_stage3.yaml")
    b = _resolved(capsys, base, RECIPES / "overlays" / "balanced_keys_full_near_stage3.yaml")
    far, near, *rest = b["data"]["synthetic"]
    assert far["task"] == near["task"] == "passkey_balanced_full" and near["depths"] == [0.95, 1.0]
    assert far["proportion"] + near["proportion"] == a["data"]["synthetic"][0]["proportion"] == 0.5
    window = b["model"]["config"]["window"]
    assert max(near["lengths"]) * (1 - near["depths"][0]) < window  # every near key inside the window
    far["proportion"] = 0.5
    b["data"]["synthetic"] = [far, *rest]
    assert a == b


@pytest.mark.parametrize("name", BALANCED[3])
def test_asks_overlay_is_the_balanced_stage_3_mixture_asking_four_times(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    base = RECIPES / f"{name}.yaml"
    a = _resolved(capsys, base, RECIPES / "overlays" / "balanced_keys_stage3.yaml")
    b = _resolved(capsys, base, RECIPES / "overlays" / "balanced_keys_asks4_stage3.yaml")
    assert [s["asks"] for s in a["data"]["synthetic"]] == [1, 1, 1]
    assert [s.pop("asks") for s in b["data"]["synthetic"]] == [4, 4, 4]
    for s in a["data"]["synthetic"]:
        s.pop("asks")
    assert a == b


def test_copy_curve_overlay_changes_only_how_often_stage_1_decodes(capsys, monkeypatch):
    """recipes/overlays/copy_curve.yaml: the stage-1 recipe with its RetrievalEval every 300 steps, 4 keys a cell;
    everything else (schedule, data, model) is the recipe's, so its step-900 cell is the recipe's model."""
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    base = RECIPES / "retrieval_small_copy.yaml"
    a = _resolved(capsys, base)
    b = _resolved(capsys, base, RECIPES / "overlays" / "copy_curve.yaml")
    (ra,), (rb,) = a["trainer"].pop("callbacks"), b["trainer"].pop("callbacks")
    assert ra["class_path"] == rb["class_path"] == "memsparse.train.callbacks.RetrievalEval"
    assert (rb["init_args"]["every_n_steps"], rb["init_args"]["samples"]) == (300, 4)
    assert a["trainer"]["max_steps"] % 300 == 0  # the recipe's last step is one of the curve's
    for key in ("every_n_steps", "samples"):
        ra["init_args"].pop(key), rb["init_args"].pop(key)
    assert ra == rb and a == b


@pytest.mark.parametrize("name", ["retrieval_small", "ablation_retrieval_no_memory"])
def test_near_keys_overlay_gives_back_the_whole_passkey_share(name, capsys, monkeypatch):
    """The stage-2 recipes hold 0.2 of passkey's 0.5 at depths 0-0.25; recipes/overlays/near_keys_stage2.yaml gives
    the earlier mixture (the whole 0.5 at depths 0-1) and changes nothing else."""
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    a = _resolved(capsys, RECIPES / f"{name}.yaml")
    b = _resolved(capsys, RECIPES / f"{name}.yaml", RECIPES / "overlays" / "near_keys_stage2.yaml")
    sa, sb = a["data"].pop("synthetic"), b["data"].pop("synthetic")
    assert a == b
    assert [s for s in sa if s["depths"] == [0.0, 1.0]] == [dict(sb[0], proportion=0.3), *sb[1:]]
    far = [s for s in sa if s["depths"] != [0.0, 1.0]]
    assert far == [dict(sb[0], proportion=0.2, lengths=[2048], depths=[0.0, 0.25])]


def test_profile_overlay_changes_only_the_callbacks_and_the_stop(capsys, monkeypatch):
    """recipes/overlays/profile_steps.yaml: the recipe's model, data and schedule, 105 steps, StepProfiler at step
    100 in place of the recipe's callbacks."""
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    base = RECIPES / "retrieval_small.yaml"
    a = _resolved(capsys, base)
    b = _resolved(capsys, base, RECIPES / "overlays" / "profile_steps.yaml")
    (prof,) = b["trainer"].pop("callbacks")
    assert prof["class_path"] == "memsparse.train.step_profiler.StepProfiler"
    assert prof["init_args"]["start_step"] + prof["init_args"]["steps"] == b["trainer"]["max_steps"] == 105
    a["trainer"].pop("callbacks")
    for key in ("max_steps", "max_time"):
        a["trainer"].pop(key), b["trainer"].pop(key)
    assert a == b


@pytest.mark.parametrize("name", ["retrieval_small_copy", "retrieval_small", "retrieval_small_long"])
def test_curriculum_memory_is_linear_in_layers_0_3_5_and_the_old_memory_is_one_overlay(name, capsys, monkeypatch):
    """Each stage's memories: linear maps in layers 0/3/5 with a 4-tap convolution started at random (what the
    2026-12-07 overlays memory_layer0_conv.yaml + memory_linear.yaml set, now no-ops); memory_mlp_layers135.yaml
    restores the 2-layer MLPs in layers 1/3/5 without a convolution and changes nothing else."""
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    base = RECIPES / f"{name}.yaml"
    a = _resolved(capsys, base)
    c = a["model"]["config"]
    assert (c["memory_layers"], c["memory"]["depth"], c["memory"]["conv"], c["memory"]["conv_init"]) == (
        [0, 3, 5], 1, 4, "random")
    over = [RECIPES / "overlays" / f for f in ("memory_layer0_conv.yaml", "memory_linear.yaml")]
    assert _resolved(capsys, base, *over) == a
    b = _resolved(capsys, base, RECIPES / "overlays" / "memory_mlp_layers135.yaml")
    cb = b["model"]["config"]
    assert (cb["memory_layers"], cb["memory"]["depth"], cb["memory"]["conv"], cb["memory"]["conv_init"]) == (
        [1, 3, 5], 2, 0, "identity")
    for x in (c, cb):
        x.pop("memory_layers"), x["memory"].pop("depth"), x["memory"].pop("conv"), x["memory"].pop("conv_init")
    assert a == b


@pytest.mark.parametrize("name", BALANCED[1][:1] + BALANCED[3][:1])
def test_memory_conv8_overlay_widens_only_the_convolution(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    a = _resolved(capsys, RECIPES / f"{name}.yaml")
    b = _resolved(capsys, RECIPES / f"{name}.yaml", RECIPES / "overlays" / "memory_conv8.yaml")
    assert (a["model"]["config"]["memory"].pop("conv"), b["model"]["config"]["memory"].pop("conv")) == (4, 8)
    assert b["model"]["config"]["memory"]["conv_init"] == "random" and a == b


@pytest.mark.parametrize("name", BALANCED[1])
def test_multikey_pair_overlay_changes_only_the_multikey_task(name, capsys, monkeypatch):
    """recipes/overlays/multikey_pair_stage1.yaml copies stage 1's mixture with two needles instead of four."""
    monkeypatch.setattr(sys, "argv", ["memsparse-train"])
    a = _resolved(capsys, RECIPES / f"{name}.yaml")
    b = _resolved(capsys, RECIPES / f"{name}.yaml", RECIPES / "overlays" / "multikey_pair_stage1.yaml")
    tasks = [s["task"] for s in b["data"]["synthetic"]]
    assert "niah_multikey_pair" in tasks and "niah_multikey" not in tasks
    for s in b["data"]["synthetic"]:
        s["task"] = "niah_multikey" if s["task"] == "niah_multikey_pair" else s["task"]
    assert a == b, name
