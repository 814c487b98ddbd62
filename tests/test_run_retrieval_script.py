"""benchmarks/run_retrieval.sh builds each stage's memsparse-train command from its environment variables; the GPU
runs it, here fake `python3` / `memsparse-eval` / `nvidia-smi` on PATH record the commands it would run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_faked(script: str, cwd: Path, tmp_path: Path, prefix: str, env: dict,
              exit_3_on: str | None = None, code: int = 3) -> tuple[int, list[str], str]:
    """Run a benchmarks/ script under bash with fake `python3` / `memsparse-eval` / `nvidia-smi` on PATH, each
    recording `prefix` (evaluated by bash) and its command line: (exit status, the recorded lines, output). With
    `exit_3_on`, the fake `python3` exits `code` (3 unless given) when its command line holds that string."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    for name in ("python3", "memsparse-eval", "nvidia-smi"):
        fake_cmd = fake / name
        gate = f'[[ "$*" == *"{exit_3_on}"* ]] && exit {code}\n' if exit_3_on and name == "python3" else ""
        fake_cmd.write_text(f'#!/usr/bin/env bash\necho "{prefix}{name} $*" >> "{calls}"\n{gate}')
        fake_cmd.chmod(0o755)
    full = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "EVALS": "", "NAME": "t", **env}
    p = subprocess.run(["bash", script], cwd=cwd, env=full, capture_output=True, text=True, timeout=60)
    return p.returncode, calls.read_text().splitlines() if calls.exists() else [], p.stdout + p.stderr


def run_script(tmp_path: Path, **env: str) -> tuple[int, list[str], str]:
    """(exit status, the recorded `python3 -m memsparse.train.cli fit` commands, stdout + stderr)."""
    rc, lines, out = run_faked("benchmarks/run_retrieval.sh", ROOT, tmp_path, "",
                               {"OUT": str(tmp_path / "out"), **env})
    return rc, [ln for ln in lines if ln.startswith("python3 -m memsparse.train.cli fit")], out


def test_balanced_keys_in_the_listed_stages_only(tmp_path):
    rc, fits, out = run_script(tmp_path, STAGES="1 2 3", KEYS="balanced", KEYS_STAGES="1 2")
    assert rc == 0, out
    assert len(fits) == 3
    assert "overlays/balanced_keys_stage1.yaml" in fits[0] and "overlays/balanced_keys_stage2.yaml" in fits[1]
    assert "balanced" not in fits[2] and "recipes/retrieval_small_long.yaml" in fits[2]


def test_balanced_keys_in_every_stage_by_default(tmp_path):
    rc, fits, out = run_script(tmp_path, STAGES="1 2", KEYS="balanced")
    assert rc == 0, out
    assert all("balanced_keys_stage" in f for f in fits) and len(fits) == 2


def test_stage_arguments_reach_their_stage_only(tmp_path):
    rc, fits, out = run_script(tmp_path, STAGES="1 2", TRAIN_ARGS="--data.seed 1", TRAIN_ARGS2="--model.lr 1e-3")
    assert rc == 0, out
    assert all("--data.seed 1" in f for f in fits)
    assert "--model.lr 1e-3" not in fits[0] and fits[1].rstrip().split(" --trainer.logger")[0].endswith(
        "--data.seed 1 --model.lr 1e-3")


def test_keys_stages_without_balanced_keys_is_refused(tmp_path):
    rc, fits, out = run_script(tmp_path, STAGES="1", KEYS_STAGES="1")
    assert rc == 2 and fits == [] and "KEYS_STAGES needs KEYS=balanced" in out


def test_passkey_eval_is_followed_by_hits_per_key_with_the_tokenizer(tmp_path):
    rc, fits, out = run_script(tmp_path, STAGES="2", EVALS="passkey", PASSKEY_LENGTHS="1k", SAMPLES="2")
    assert rc == 0, out
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    ev = [c for c in calls if c.startswith("memsparse-eval")]
    by_key = [c for c in calls if "benchmarks/passkey_by_key.py" in c]
    assert len(ev) == 1 and "--checkpoint outputs/retrieval_small/export" in ev[0] and "--samples 2" in ev[0]
    assert "--seed 0" in ev[0]
    assert len(by_key) == 1 and "--tokenizer outputs/retrieval_small/export" in by_key[0]
    assert f"t={tmp_path}/out/t/eval_passkey/results.json" in by_key[0]


def run_seeds(tmp_path: Path, **env: str) -> tuple[int, list[str], str]:
    """benchmarks/run_retrieval_seeds.sh from a directory holding a stage-1 export: (exit status, the recorded
    `python3 -m memsparse.train.cli fit` commands, each prefixed by the directory it ran in, stdout + stderr)."""
    here = tmp_path / "repo"
    (here / "outputs" / "retrieval_small_copy" / "export").mkdir(parents=True, exist_ok=True)
    for d in ("recipes", "benchmarks"):
        if not (here / d).exists():
            (here / d).symlink_to(ROOT / d)
    rc, lines, out = run_faked("benchmarks/run_retrieval_seeds.sh", here, tmp_path, "$(pwd) ",
                               {"OUT": "out", "WORK": str(tmp_path / "work"), **env})
    return rc, sorted(ln for ln in lines if " python3 -m memsparse.train.cli fit" in ln), out


def test_seeds_run_stage_two_once_per_data_seed_each_in_its_own_directory(tmp_path):
    rc, fits, out = run_seeds(tmp_path, SEEDS="0 3", TRAIN_ARGS2="--model.lr 1e-3", STEPS2="50")
    assert rc == 0, out
    assert len(fits) == 2
    for f, s in zip(fits, ("0", "3")):
        assert f.startswith(f"{tmp_path}/work/data_seed{s} ") and "recipes/retrieval_small.yaml" in f
        assert f"--data.seed {s} --model.lr 1e-3" in f and "--trainer.max_steps 50" in f
    for s in ("0", "3"):  # stage 1's export reached through a link; results under OUT, named by seed
        assert (tmp_path / "work" / f"data_seed{s}" / "outputs" / "retrieval_small_copy" / "export").is_dir()
        assert (tmp_path / "repo" / "out" / f"t_data_seed{s}" / "steps.log").exists()


def test_seeds_refuse_stage_one_and_a_missing_export(tmp_path):
    rc, fits, out = run_seeds(tmp_path, STAGES="1 2")
    assert rc == 2 and fits == [] and "run STAGES=1" in out
    rc, fits, out = run_seeds(tmp_path, SEEDS="x")
    assert rc == 2 and fits == [] and "non-negative integers" in out
    rc, fits, out = run_seeds(tmp_path, MEM="0")
    assert rc == 2 and fits == [] and "no outputs/ablation_retrieval_no_memory_copy/export" in out


def test_seeds_side_by_side_and_resumed(tmp_path):
    """PARALLEL=1 runs the same commands at once; RESUME=1 needs each seed's earlier directory and keeps it."""
    rc, fits, out = run_seeds(tmp_path, SEEDS="0 1", PARALLEL="1")
    assert rc == 0 and len(fits) == 2, out
    marker = tmp_path / "work" / "data_seed1" / "outputs" / "kept"
    marker.write_text("x")
    rc, fits, out = run_seeds(tmp_path, SEEDS="1", RESUME="1", TRAIN_ARGS2="--ckpt_path last")
    assert rc == 0 and marker.exists(), out
    assert any("--data.seed 1 --ckpt_path last" in f for f in fits)
    rc, _, out = run_seeds(tmp_path, SEEDS="1 7", RESUME="1")
    assert rc == 2 and "RESUME=1: no earlier run in" in out and "data_seed7" in out


def test_a_stage_with_retrieval_cells_gets_its_table_by_step(tmp_path):
    """After a stage whose RetrievalEval wrote cells, run_retrieval.sh copies them and tabulates them by step."""
    assert run_seeds(tmp_path, SEEDS="0")[0] == 0
    cells = tmp_path / "work" / "data_seed0" / "outputs" / "retrieval_small" / "retrieval"
    cells.mkdir(parents=True)
    (cells / "cells.jsonl").write_text("{}\n")
    rc, _, out = run_seeds(tmp_path, SEEDS="0", RESUME="1")
    assert rc == 0, out
    calls = (tmp_path / "calls.txt").read_text()
    d = tmp_path / "repo" / "out" / "t_data_seed0"
    assert f"benchmarks/retrieval_by_step.py retrieval_small={d}/retrieval_while_training_retrieval_small/cells.jsonl" \
        f" --name by_step_retrieval_small --out {d}" in calls
    assert (d / "retrieval_while_training_retrieval_small" / "cells.jsonl").exists()


def test_eval_seed_and_batch_reach_every_eval_grid(tmp_path):
    rc, _, out = run_script(tmp_path, STAGES="2", TRAIN="0", EVALS="passkey niah", PASSKEY_LENGTHS="1k", EVAL_SEED="1",
                            EVAL_BATCH="25")
    assert rc == 0, out
    ev = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("memsparse-eval")]
    assert len(ev) == 2 and all("--seed 1 --batch 25 " in c for c in ev)


@pytest.mark.parametrize("env,lengths", [({}, "8k,32k"), ({"NIAH_LENGTHS": "4k,6k,8k"}, "4k,6k,8k")])
def test_niah_lengths_set_the_niah_grid(tmp_path, env, lengths):
    rc, _, out = run_script(tmp_path, STAGES="2", TRAIN="0", EVALS="niah", **env)
    assert rc == 0, out
    (ev,) = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("memsparse-eval")]
    assert f"--tasks niah_single,niah_multikey --lengths {lengths} " in ev


def test_eval_batch_defaults_to_a_lengths_25_prompts(tmp_path):
    rc, _, out = run_script(tmp_path, STAGES="2", TRAIN="0", EVALS="passkey", PASSKEY_LENGTHS="1k")
    assert rc == 0, out
    ev = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("memsparse-eval")]
    assert len(ev) == 1 and "--seed 0 --batch 25 " in ev[0]


def test_train_0_evaluates_the_last_listed_stage_without_training(tmp_path):
    rc, fits, out = run_script(tmp_path, STAGES="1 2 3 4", TRAIN="0", EVALS="passkey", PASSKEY_LENGTHS="8k")
    assert rc == 0, out
    assert fits == []
    ev = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("memsparse-eval")]
    assert len(ev) == 1 and "--checkpoint outputs/retrieval_small_long_more/export" in ev[0]


def test_memory_gate_stops_after_stage_two_when_not_met(tmp_path):
    """MEMORY_GATE=N: retrieval_by_step.py --memory-gate N after stage 2; its exit 3 skips stages 3-4 and the evals."""
    here = tmp_path / "repo"
    (here / "outputs" / "retrieval_small" / "retrieval").mkdir(parents=True)
    (here / "outputs" / "retrieval_small" / "retrieval" / "cells.jsonl").write_text("{}\n")
    for d in ("recipes", "benchmarks"):
        (here / d).symlink_to(ROOT / d)
    env = {"OUT": "out", "STAGES": "2 3", "EVALS": "passkey", "MEMORY_GATE": "5"}
    rc, lines, out = run_faked("benchmarks/run_retrieval.sh", here, tmp_path, "", env, exit_3_on="--memory-gate 5")
    fits = [ln for ln in lines if ln.startswith("python3 -m memsparse.train.cli fit")]
    assert rc == 3 and len(fits) == 1 and "retrieval_small.yaml" in fits[0], out
    assert not any(ln.startswith("memsparse-eval") for ln in lines)
    assert "MEMORY_GATE=5 not met" in (here / "out" / "t" / "steps.log").read_text()
    (tmp_path / "calls.txt").unlink()
    rc, lines, out = run_faked("benchmarks/run_retrieval.sh", here, tmp_path, "", env)  # gate met: on to stage 3
    fits = [ln for ln in lines if ln.startswith("python3 -m memsparse.train.cli fit")]
    assert rc == 0 and len(fits) == 2 and "retrieval_small_long.yaml" in fits[1], out


def test_stage_one_that_does_not_copy_is_logged_and_the_run_goes_on(tmp_path):
    """Stage 1's retrieval_by_step.py runs with --copy-check; its exit 4 writes a warning to steps.log, stage 2
    follows."""
    here = tmp_path / "repo"
    (here / "outputs" / "retrieval_small_copy" / "retrieval").mkdir(parents=True)
    (here / "outputs" / "retrieval_small_copy" / "retrieval" / "cells.jsonl").write_text("{}\n")
    for d in ("recipes", "benchmarks"):
        (here / d).symlink_to(ROOT / d)
    env = {"OUT": "out", "STAGES": "1 2"}
    rc, lines, out = run_faked("benchmarks/run_retrieval.sh", here, tmp_path, "", env, exit_3_on="--copy-check",
                               code=4)
    fits = [ln for ln in lines if ln.startswith("python3 -m memsparse.train.cli fit")]
    assert rc == 0 and len(fits) == 2, out
    checks = [ln for ln in lines if "retrieval_by_step.py" in ln]
    assert len(checks) == 1 and "--copy-check" in checks[0] and "retrieval_small_copy" in checks[0]
    assert "stage 1: warning: no key decoded inside the window" in (here / "out" / "t" / "steps.log").read_text()


def test_near_evaluates_the_key_next_to_the_question_with_the_writes_on_then_off(tmp_path):
    rc, _, out = run_script(tmp_path, STAGES="3", TRAIN="0", EVALS="near", NEAR_LENGTHS="32k,128k")
    assert rc == 0, out
    ev = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("memsparse-eval")]
    assert len(ev) == 2 and all("--lengths 32k,128k --depths 1 " in c for c in ev)
    assert "--no-memory-writes" not in ev[0] and ev[1].endswith("--no-memory-writes")
    assert "eval_near " in ev[0] + " " and "eval_near_no_memory_writes" in ev[1]


def test_stage_one_tokenizer_comes_back_with_the_results(tmp_path):
    """The BPE stage 1 trained is copied into the run's results (key statistics offline need exactly it)."""
    here = tmp_path / "repo"
    (here / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "run_retrieval.sh", here / "benchmarks")
    tok = here / "outputs" / "retrieval_small_copy" / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text("{}")
    rc, _, out = run_faked("benchmarks/run_retrieval.sh", here, tmp_path, "", {"OUT": str(tmp_path / "out"),
                                                                              "STAGES": "1 2"})
    assert rc == 0, out
    assert (tmp_path / "out" / "t" / "tokenizer" / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / "out" / "t" / "tokenizer" / "tokenizer").exists()  # replaced, not nested


def test_seeds_from_stage_two_repeat_stage_three_with_the_seed_in_its_arguments(tmp_path):
    """FROM=2: stage 3 once per data seed from one stage-2 export (linked with stage 1's outputs, whose tokenizer
    stage 3 reuses), the seed before TRAIN_ARGS3; stage 2 is refused, as is a missing stage-2 export."""
    rc, fits, out = run_seeds(tmp_path, FROM="2", SEEDS="1 2")
    assert rc == 2 and fits == [] and "no outputs/retrieval_small/export" in out and 'STAGES="1 2"' in out
    (tmp_path / "repo" / "outputs" / "retrieval_small" / "export").mkdir(parents=True)
    rc, fits, out = run_seeds(tmp_path, FROM="2", SEEDS="1 2", TRAIN_ARGS3="--model.lr 1e-4",
                              TRAIN_ARGS2="--never-used")
    assert rc == 0 and len(fits) == 2, out
    for f, s in zip(fits, ("1", "2")):
        assert f.startswith(f"{tmp_path}/work/data_seed{s} ") and "recipes/retrieval_small_long.yaml" in f
        assert f"--data.seed {s} --model.lr 1e-4" in f and "--never-used" not in f
        for stage in ("retrieval_small_copy", "retrieval_small"):
            assert (tmp_path / "work" / f"data_seed{s}" / "outputs" / stage / "export").is_dir()
    rc, _, out = run_seeds(tmp_path, FROM="2", STAGES="2 3")
    assert rc == 2 and "repeats stages 3-4" in out
    rc, _, out = run_seeds(tmp_path, FROM="3")
    assert rc == 2 and "FROM is 1" in out
