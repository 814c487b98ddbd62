"""Test setup: CPU-only, seeded; Triton kernels run through the interpreter (set before triton is imported)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (tiny_recipe.py) import by name
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton_interpreter  # noqa: E402

triton_interpreter.install()  # the interpreter without work whose results it never uses (test speed only)

# One intra-op thread: the tests' tensors are small, more threads gained nothing on 2 cores, and two threads spin
# against any other busy process (with another test run on the machine, tests on two threads ran up to 20x slower).
# test_learnability.py trains its models in Python threads instead.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _memory_write_state_and_grads(mem, x, impl):
    """The memory written with x (learned soft gate at its init, one head scale/bias each): the final weights
    and momentum flattened, and every parameter's gradient of sin(...).sum() of them."""
    mem.zero_grad()
    H = mem.heads
    st, _ = mem.write(mem.init_state(x.shape[0]), mem.project(x), impl=impl,
                      gate_params=(torch.ones(H), torch.zeros(H)))
    flat = torch.cat([t.flatten() for t in st.weights + st.momentum])
    flat.sin().sum().backward()
    return flat.detach(), {n: p.grad.clone() for n, p in mem.named_parameters() if p.grad is not None}


def _tiny_memory_model(**kw):
    """A two-layer model with a depth-2 silu memory (the kernels' case) and one consolidation pass."""
    from memsparse.config import ConsolidationConfig, MemoryConfig, ModelConfig
    from memsparse.model import MemSparseLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, dim=32, depth=2, heads=2, kv_heads=2, head_dim=16, mlp_hidden=64, block_size=16,
                      segment=32, window=64, persistent_tokens=16, budget="fixed:3", memory_layers=[1],
                      memory=MemoryConfig(heads=2, head_dim=16, depth=2, expansion=2, chunk_size=32),
                      consolidation=ConsolidationConfig(mode="fixed", passes=1, train_passes=1), **kw)
    return MemSparseLM(cfg)


def _model_loss_and_grads(model, ids):
    """One training forward/backward on ids (labels = ids): the loss and every parameter's gradient."""
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def kernel_checks():
    """Harness shared by the kernel test files: a kernel path against the PyTorch one on the same memory/model."""
    from types import SimpleNamespace

    return SimpleNamespace(memory_write=_memory_write_state_and_grads, tiny_model=_tiny_memory_model,
                           model_step=_model_loss_and_grads)
