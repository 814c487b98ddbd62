"""A fingerprint of the training math and the retrieval data, to tell a code regression from run-to-run spread.

Prints one JSON object: the loss and gradient norm of 10 AdamW steps of a miniature of the retrieval recipes' model
(MAC, memory in 2 of 4 layers, surprise gate, `length_scaled`, persistent tokens, tied embeddings; float64 on CPU),
with and without packed `doc_ids`, and SHA-256 hashes of the first 5 training batches of stage 3's data module
(`recipes/retrieval_small_long.yaml`'s mixture, 300 samples; byte tokenizer, and a 2,048-token BPE with merged
digits trained on 20 stdlib modules). It uses only APIs older commits have too, so the same file can fingerprint
another checkout:

    git worktree add /tmp/old ee328e4
    (cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/benchmarks/fingerprint.py --work /tmp/fp_old) > old.json
    python benchmarks/fingerprint.py --work /tmp/fp_new > new.json
    diff old.json new.json && echo same

It says on stderr which checkout's `memsparse` and `train/data.py` it used (the one PYTHONPATH puts first).

Equal output: the two commits compute the same function on these inputs and train on the same batches.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import shutil
import sys
from pathlib import Path

import torch


def training_trace(doc_ids: bool, steps: int = 10) -> list[list[str]]:
    """[[loss, grad norm] as 12-decimal strings] of `steps` AdamW steps on seeded random tokens (answer-only labels)."""
    from memsparse.config import MemoryConfig, ModelConfig
    from memsparse.model import MemSparseLM

    cfg = ModelConfig(vocab_size=300, dim=64, depth=4, heads=4, kv_heads=2, head_dim=16, mlp_hidden=128,
                      block_size=16, segment=32, window=64, persistent_tokens=16,
                      budget="length_scaled:c=12,min_tokens=64", variant="mac", memory_layers=[1, 3],
                      memory=MemoryConfig(heads=4, head_dim=16, depth=2, expansion=4, chunk_size=32,
                                          forget_init=3e-6),
                      surprise_gate=True, tie_embeddings=True)
    torch.manual_seed(0)
    model = MemSparseLM(cfg).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 256), generator=g)
        labels = ids.clone()
        labels[:, :100] = -100
        kw = {}
        if doc_ids:  # two documents then padding; three documents
            doc = torch.zeros(2, 256, dtype=torch.long)
            doc[0, 90:], doc[0, 230:] = 1, -1
            doc[1, 150:], doc[1, 170:] = 1, 2
            labels[doc < 0] = -100
            kw["doc_ids"] = doc
        loss = model(ids, labels=labels, **kw).loss
        opt.zero_grad()
        loss.backward()
        norm = sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5
        opt.step()
        out.append([f"{loss.item():.12f}", f"{norm.item():.12f}"])
    return out


@functools.cache
def data_module():
    """The `train/data.py` module of the checkout `memsparse` was imported from (PYTHONPATH picks the checkout; an
    editable install would otherwise map `memsparse.train` to the installed one)."""
    import importlib

    import memsparse

    root = Path(memsparse.__file__).resolve().parents[1]
    if (root / "train" / "data.py").is_file():
        sys.path.insert(0, str(root))
        return importlib.import_module("train.data")
    return importlib.import_module("memsparse.train.data")


def data_hash(tokenizer: str, work: Path) -> str:
    """SHA-256 of the first 5 training batches (input_ids, labels, doc_ids) of stage 3's mixture."""
    data = data_module()
    MemSparseDataModule, SyntheticSpec = data.MemSparseDataModule, data.SyntheticSpec

    kw = dict(stdlib_limit=20, tokenizer=tokenizer, seq_len=6144, batch_size=12, val_fraction=0.05, seed=0,
              synthetic=[SyntheticSpec(task="passkey", proportion=0.5, lengths=[1024, 4096, 5120, 6144, 6144]),
                         SyntheticSpec(task="niah_single", proportion=0.25, lengths=[4096, 5120, 6144]),
                         SyntheticSpec(task="niah_multikey", proportion=0.25, lengths=[4096, 6144])],
              synthetic_loss="answer", synthetic_samples=300, cache_dir=str(work / f"cache_{tokenizer}"),
              tokenizer_dir=str(work / f"tokenizer_{tokenizer}"))
    if tokenizer == "bpe":
        kw["vocab_size"] = 2048
        if "bpe_split_digits" in inspect.signature(MemSparseDataModule.__init__).parameters:
            kw["bpe_split_digits"] = False  # the recipes' setting (and the only one before the option existed)
    dm = MemSparseDataModule(**kw)
    dm.prepare_data()
    dm.setup("fit")
    h = hashlib.sha256()
    for i, b in enumerate(dm.train_dataloader()):
        for k in ("input_ids", "labels", "doc_ids"):
            h.update(b[k].numpy().tobytes())
        if i == 4:
            break
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/memsparse_fingerprint",
                    help="scratch directory for the tokenizers and data caches (emptied first)")
    ap.add_argument("--no-data", action="store_true", help="the training traces only (no BPE training)")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.set_num_threads(1)
    import memsparse

    print(f"fingerprint: memsparse from {Path(memsparse.__file__).resolve().parent}", file=sys.stderr)
    result = {"train": training_trace(False), "train_doc_ids": training_trace(True)}
    if not args.no_data:
        result["data_byte"] = data_hash("byte", work)
        result["data_bpe"] = data_hash("bpe", work)
        print(f"fingerprint: data from {data_module().__file__}", file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
