"""StepProfiler: a window of training steps profiled on CPU; the summary's arithmetic on made-up events."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from memsparse.train.step_profiler import StepProfiler, _union_ms, summarize, summarize_trace


def _event(name, start_us=0.0, dur_us=0.0, self_cpu=0.0, device=False, annotation=False):
    dev = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    rng = SimpleNamespace(start=start_us, elapsed_us=lambda: dur_us)
    return SimpleNamespace(name=name, device_type=dev, time_range=rng, self_cpu_time_total=self_cpu,
                           cpu_time_total=dur_us, is_user_annotation=annotation)


def test_summary_counts_busy_device_time_once_and_the_host_waits():
    assert _union_ms([(0, 1000), (500, 1500), (3000, 4000), (3100, 3200)]) == pytest.approx(2.5)
    events = [_event("gemm", 0, 1000, device=True), _event("gemm", 500, 1000, device=True),
              _event("softmax", 3000, 1000, device=True),
              _event("cudaStreamSynchronize", dur_us=4000, self_cpu=4000),
              _event("aten::_local_scalar_dense", self_cpu=10), _event("aten::_local_scalar_dense", self_cpu=10),
              _event("Optimizer.step#AdamW.step", self_cpu=2000),
              # the optimizer's record_function range on the device timeline (H100, 2026-12-06: it spanned the
              # whole step and was counted as busy): not a kernel
              _event("Optimizer.step#AdamW.step", 0, 9000, device=True, annotation=True)]
    s = summarize(events, steps=2, wall_s=0.010)
    assert s["wall_ms_per_step"] == pytest.approx(5.0)
    assert s["device_busy_ms_per_step"] == pytest.approx(1.25)  # 2.5 ms of union over 2 steps, not 3 ms summed
    assert s["device_idle_share"] == pytest.approx(0.75)
    assert s["host_syncs_per_step"] == 0.5 and s["host_sync_ms_per_step"] == pytest.approx(2.0)
    assert s["scalar_reads_per_step"] == 1.0
    assert s["top_device_kernels"][0] == {"name": "gemm", "ms_per_step": pytest.approx(1.0)}
    assert s["top_host_ops"][0]["name"] == "cudaStreamSynchronize"
    cpu_only = summarize([_event("aten::mm", self_cpu=100)], steps=1, wall_s=0.001)
    assert cpu_only["device_busy_ms_per_step"] is None and cpu_only["device_idle_share"] is None


def test_profiles_the_window_of_a_cpu_fit(tmp_path):
    import lightning.pytorch as pl
    from memsparse.train.data import MemSparseDataModule
    from memsparse.train.module import MemSparseLightningModule
    from tiny_recipe import tiny_model

    from memsparse.config import ModelConfig, from_dict

    torch.manual_seed(0)
    module = MemSparseLightningModule(from_dict(ModelConfig, {**tiny_model(), "vocab_size": 259}), lr=3e-3,
                                      warmup_steps=1, total_steps=8)
    prof = StepProfiler(start_step=2, steps=3, trace=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path), callbacks=[prof])
    trainer.fit(module, datamodule=MemSparseDataModule(stdlib_limit=4, tokenizer="byte", seq_len=64, batch_size=2,
                                                       val_fraction=0.0))
    out = tmp_path / "profile"
    s = json.loads((out / "step_profile.json").read_text())
    assert s["steps"] == 3 and s["start_step"] == 2 and s["wall_ms_per_step"] > 0
    assert s["device_busy_ms_per_step"] is None  # CPU: no device activity
    names = {r["name"] for r in s["top_host_ops"]}
    assert any(n.startswith("Optimizer.step") for n in names)  # the optimizer step is inside the window
    assert "| 3 |" in (out / "step_profile.md").read_text() and not (out / "step_trace.json").exists()


@pytest.mark.slow  # ~9 s (a CPU fit): the window's main path stays in the default run above
def test_a_fit_that_ends_inside_the_window_is_still_summarised(tmp_path):
    import lightning.pytorch as pl
    from memsparse.train.data import MemSparseDataModule
    from memsparse.train.module import MemSparseLightningModule
    from tiny_recipe import tiny_model

    from memsparse.config import ModelConfig, from_dict

    torch.manual_seed(0)
    module = MemSparseLightningModule(from_dict(ModelConfig, {**tiny_model(), "vocab_size": 259}), total_steps=4)
    prof = StepProfiler(start_step=1, steps=50, dirpath=str(tmp_path / "p"), trace=True, stack=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path), callbacks=[prof])
    trainer.fit(module, datamodule=MemSparseDataModule(stdlib_limit=4, tokenizer="byte", seq_len=64, batch_size=2,
                                                       val_fraction=0.0))
    assert prof.summary["steps"] == 2
    trace = json.loads((tmp_path / "p" / "step_trace.json").read_text())
    assert any(e.get("cat") == "python_function" for e in trace["traceEvents"])  # stack=True records Python frames


@pytest.mark.parametrize("kw, msg", [({"steps": 0}, "steps must be >= 1"), ({"start_step": -1}, "start_step")])
def test_bad_settings_are_one_line_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        StepProfiler(**kw)


def test_trace_summary_reads_a_chrome_trace(tmp_path):
    import gzip

    ev = [{"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 1000},
          {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 500, "dur": 1000},
          {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 3000, "dur": 1000},
          {"ph": "X", "cat": "gpu_user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 0, "dur": 4000},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 0, "dur": 2000},
          {"ph": "X", "cat": "cpu_op", "name": "aten::_local_scalar_dense", "ts": 0, "dur": 1}]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    s = summarize_trace(path, steps=2)
    assert s["device_span_ms_per_step"] == pytest.approx(2.0) and s["device_busy_ms_per_step"] == pytest.approx(1.25)
    assert s["device_idle_ms_per_step"] == pytest.approx(0.75) and s["device_kernels_per_step"] == 1.5
    assert s["host_syncs_per_step"] == 0.5 and s["scalar_reads_per_step"] == 0.5
    assert s["top_device_kernels"][0] == {"name": "gemm", "ms_per_step": pytest.approx(1.0)}
    assert "host_waits_by_caller" not in s  # recorded without stacks
    (tmp_path / "empty.json").write_text(json.dumps({"traceEvents": []}))
    with pytest.raises(ValueError, match="no device activity"):
        summarize_trace(tmp_path / "empty.json", steps=1)


def test_trace_with_stacks_names_the_code_behind_each_host_wait(tmp_path):
    """With python_function events (StepProfiler(stack=True)) each wait is charged to the innermost frame outside
    torch: two waits from training_step, one from the optimizer hook."""
    def py(name, ts, dur):
        return {"ph": "X", "cat": "python_function", "name": name, "ts": ts, "dur": dur, "tid": 1}

    def wait(ts):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": ts, "dur": 10, "tid": 1}

    ev = [{"ph": "X", "cat": "kernel", "name": "k", "ts": 0, "dur": 5, "tid": 7},
          py("train/module.py(338): training_step", 0, 100), py("torch/_tensor.py(1): __bool__", 10, 20), wait(12),
          py("torch/_tensor.py(1): __bool__", 50, 20), wait(52),
          py("train/module.py(364): on_before_optimizer_step", 200, 100), wait(210)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    by = {r["caller"]: r for r in summarize_trace(path, steps=1)["host_waits_by_caller"]}
    assert by["train/module.py(338): training_step"]["waits_per_step"] == 2
    assert by["train/module.py(364): on_before_optimizer_step"]["ms_per_step"] == pytest.approx(0.01)
