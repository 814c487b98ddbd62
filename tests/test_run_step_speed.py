"""benchmarks/run_step_speed.sh: the fits it runs (one per AdamW implementation, profiled near their end), the
comparison of their logs, and its refusals; fake `python3` / `nvidia-smi` record the commands (the GPU runs them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_run_retrieval_script import run_faked

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path: Path, **env: str):
    return run_faked("benchmarks/run_step_speed.sh", ROOT, tmp_path, "",
                     {"OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "NAME": "speed", **env})


def test_one_profiled_fit_per_implementation_then_the_comparison(tmp_path):
    for impl in ("fused", "foreach"):  # what the fits would leave
        d = tmp_path / "work" / impl / "csv" / "version_0"
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("step,train/tokens_per_s\n1,1.0\n")
    rc, calls, out = _run(tmp_path, STEPS="300")
    assert rc == 0, out
    fits = [c for c in calls if "memsparse.train.cli fit" in c]
    assert len(fits) == 2 and "--model.optimizer_impl fused" in fits[0] and "--model.optimizer_impl foreach" in fits[1]
    for f in fits:
        assert "--config recipes/retrieval_small_copy.yaml --config recipes/overlays/profile_steps.yaml" in f
        assert "--trainer.max_steps 300 --trainer.callbacks.init_args.start_step 290" in f
    compare = [c for c in calls if "compare_runs.py" in c]
    assert len(compare) == 1 and "fused=" in compare[0] and "foreach=" in compare[0]
    assert (tmp_path / "out" / "speed" / "metrics_fused.csv").is_file() and (tmp_path / "out" / "speed.tgz").is_file()


@pytest.mark.parametrize("env,message", [({"STEPS": "ten"}, "STEPS must be an integer >= 20"),
                                         ({"IMPLS": "fused adam"}, "unknown optimizer_impl adam"),
                                         ({"RECIPE": "recipes/nope.yaml"}, "no recipe recipes/nope.yaml")])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, env, message):
    rc, calls, out = _run(tmp_path, **env)
    assert rc == 2 and message in out and calls == []
