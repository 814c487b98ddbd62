"""A seeded, sharded, resumable sampler and the DataLoader that reports its position to Lightning.

Lightning 2.x (`_FitLoop.on_save_checkpoint` -> `CombinedLoader._state_dicts`) saves the state of every
train *DataLoader* that implements `state_dict`/`load_state_dict` (`lightning.fabric.utilities.types._Stateful`)
and restores it before the loader is iterated again (`_FitLoop.setup_data`). Two facts shape this module:

- Whatever prefetches must not count as consumed: Lightning's `_PrefetchDataFetcher` reads one batch
  ahead for loaders without a length (not for this one, which is sized), and workers prefetch inside the
  DataLoader. The loader therefore counts the batches its own iterator has handed out, or takes the count
  from `consumed_fn` (wired by the DataModule to the trainer's batch progress) when that is set.
- The sampler subclasses `DistributedSampler`, so Lightning does not replace it under DDP
  (`use_distributed_sampler`) and leaves the loader (and its state) alone; each rank gets a disjoint shard
  and every rank the same number of batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """Per-epoch permutation seeded by (seed, epoch), rank shard `perm[rank::num_replicas]`, mid-epoch resume.

    Each rank yields `batches_per_epoch * batch_size` indices per epoch (the tail that does not fill a
    batch on every rank is dropped, a different tail each epoch). With `epoch_indices=True` it yields
    `epoch * len(dataset) + i`, so a dataset can vary its items per epoch (it takes `index % len`).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        epoch_indices: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size, self.epoch_indices = batch_size, epoch_indices
        self.dataset_len = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = (self.dataset_len // num_replicas) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set has {self.dataset_len} sequences: fewer than batch_size={batch_size} x "
                f"world_size={num_replicas}; add data, or lower batch_size or seq_len")
        self.num_samples = self.batches_per_epoch * batch_size  # per rank
        self.total_size = self.num_samples * num_replicas
        self.start_batch = 0  # where the next iteration of this epoch begins (consumed once)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at each epoch start; a new epoch begins at its first batch."""
        if epoch != self.epoch:
            self.epoch, self.start_batch = epoch, 0

    def indices(self, epoch: int) -> np.ndarray:
        """(num_samples,) this rank's dataset indices for `epoch`, in order (without the epoch offset)."""
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
        else:
            perm = np.arange(self.dataset_len)
        return perm[: self.total_size][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0
        offset = epoch * self.dataset_len if self.epoch_indices else 0
        for i in self.indices(epoch)[start * self.batch_size :]:
            yield int(i) + offset

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Position as (epoch, batches consumed in it); the rank is not stored (ranks share one state)."""
        return {
            "epoch": int(self.epoch),
            "batch": int(self.start_batch if batches_consumed is None else batches_consumed),
            "seed": int(self.seed),
            "batch_size": int(self.batch_size),
            "num_replicas": int(self.num_replicas),
            "dataset_len": int(self.dataset_len),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state`'s position; a finished epoch continues at the next one's first batch."""
        changed = {k: (state[k], getattr(self, k)) for k in ("seed", "batch_size", "num_replicas", "dataset_len")
                   if k in state and state[k] != getattr(self, k)}
        if changed:
            warnings.warn(
                f"resuming the train loader with different settings {changed} (saved, now): the order of the "
                "remaining batches will not match the interrupted run", stacklevel=2)
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.start_batch = epoch, batch


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableDistributedSampler` whose position Lightning checkpoints and restores.

    `consumed_fn() -> int | None`, when set, gives the batches of the current epoch that the training loop
    has consumed (prefetched batches excluded); otherwise the loader counts the batches it has yielded.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableDistributedSampler, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", sampler.batch_size)
        kwargs.setdefault("drop_last", True)
        if kwargs["batch_size"] != sampler.batch_size:
            raise ValueError(f"batch_size {kwargs['batch_size']} != sampler.batch_size {sampler.batch_size}")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.consumed_fn: Callable[[], int | None] | None = None
        self._base = 0  # batches already consumed when the current iteration started
        self._yielded = 0
        self._iter_epoch: int | None = None  # the sampler epoch of the current/last iteration

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableDistributedSampler = self.sampler  # type: ignore[assignment]
        self._base, self._yielded, self._iter_epoch = sampler.start_batch, 0, sampler.epoch
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: ResumableDistributedSampler = self.sampler  # type: ignore[assignment]
        consumed = self.consumed_fn() if self.consumed_fn is not None else None
        if consumed is None:
            # not iterated in the sampler's current epoch yet (fresh, resumed or after set_epoch): its start
            consumed = self._base + self._yielded if self._iter_epoch == sampler.epoch else sampler.start_batch
        return sampler.state_dict(consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler: ResumableDistributedSampler = self.sampler  # type: ignore[assignment]
        sampler.load_state_dict(state)
        self._base, self._yielded, self._iter_epoch = sampler.start_batch, 0, None
