"""Distributed helpers that also work without a process group, and deterministic per-rank sample streams.

`init_distributed()` reads the environment `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and starts a process group (NCCL on CUDA, gloo on CPU); without WORLD_SIZE (a plain `python` run) it starts
nothing. Every other helper (`get_rank`, `all_reduce_mean`, `barrier`, ...) works with or without a process
group, so call sites never branch on "is this DDP".

Sample streams: `InfiniteSampler` yields, for one rank, an endless sequence of item indices. Global position g
of the stream (g = 0, 1, 2, ...) maps to item `perm_e[g % n]` with `e = g // n` and `perm_e` a permutation drawn
from (seed, e) only, so any position can be recomputed without replaying the stream: resuming at iteration k is
starting the sampler at k. Rank r of W with per-rank batch B takes, at iteration t, positions
(t*W + r)*B + j for j < B, so the union over ranks of one iteration is the same as a single process with batch W*B.
"""

from __future__ import annotations

import datetime
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from common.core.device import env_int, resolve_device
from common.core.logger import get_logger

logger = get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its rank on the node and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group described by the torchrun environment, or nothing for a single process.

    NCCL is used when the device is CUDA, gloo otherwise. The device follows `common.core.device.resolve_device`
    (each CUDA rank on cuda:(LOCAL_RANK % device_count); an explicit cuda:N is refused with several processes).
    Calling it again once a group exists returns the current state.
    """
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank, world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if is_dist_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    logger.info("process group started: backend=%s rank=%d/%d local_rank=%d device=%s",
                backend, rank, world_size, local_rank, dev)
    return DistInfo(rank, world_size, local_rank, dev)


def destroy_distributed() -> None:
    """Tear the process group down if there is one."""
    if is_dist_initialized():
        dist.destroy_process_group()


def is_dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_dist_initialized() and get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _collective_device() -> torch.device:
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_tensor(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    work = t.detach().to(_collective_device(), dtype=torch.float64 if not t.is_floating_point() else t.dtype)
    work = work.clone()
    dist.all_reduce(work, op=op)
    return work.to(t.device)


def _reduce(x: Any, op: dist.ReduceOp, mean: bool) -> Any:
    world = get_world_size()
    if world == 1:
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, Mapping):
            return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else float(v)) for k, v in x.items()}
        return float(x)
    if isinstance(x, torch.Tensor):
        out = _all_reduce_tensor(x, op)
        return out / world if mean else out
    if isinstance(x, Mapping):
        keys = sorted(x)
        # Scalars travel together in one collective; tensor values get one collective each.
        scalar_keys = [k for k in keys if not isinstance(x[k], torch.Tensor)]
        out: dict[str, Any] = {}
        if scalar_keys:
            packed = torch.tensor([float(x[k]) for k in scalar_keys], dtype=torch.float64)
            packed = _all_reduce_tensor(packed, op)
            if mean:
                packed /= world
            out.update({k: float(v) for k, v in zip(scalar_keys, packed.tolist())})
        for k in keys:
            if isinstance(x[k], torch.Tensor):
                t = _all_reduce_tensor(x[k], op)
                out[k] = t / world if mean else t
        return {k: out[k] for k in x}
    packed = _all_reduce_tensor(torch.tensor([float(x)], dtype=torch.float64), op)
    return float(packed.item()) / (world if mean else 1)


def all_reduce_mean(x: float | torch.Tensor | Mapping[str, float | torch.Tensor]) -> Any:
    """Mean over ranks of a float, a tensor or a dict of them (same keys on every rank); a copy without a group."""
    return _reduce(x, dist.ReduceOp.SUM, mean=True)


def all_reduce_sum(x: float | torch.Tensor | Mapping[str, float | torch.Tensor]) -> Any:
    """Sum over ranks of a float, a tensor or a dict of them; a copy without a group."""
    return _reduce(x, dist.ReduceOp.SUM, mean=False)


def all_reduce_max(x: float | torch.Tensor | Mapping[str, float | torch.Tensor]) -> Any:
    """Maximum over ranks (e.g. of stop flags), a copy without a group."""
    return _reduce(x, dist.ReduceOp.MAX, mean=False)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj` as a list indexed by rank ([obj] without a group)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of `items`: item i goes to rank i % world_size (default: the current process group).

    Shard before loading, so each rank only reads its own cases; the union over ranks is `items`, once each.
    """
    rank = get_rank() if rank is None else int(rank)
    world_size = get_world_size() if world_size is None else int(world_size)
    return [item for index, item in enumerate(items) if index % world_size == rank]


class RankFailedError(RuntimeError):
    """Another rank failed in a step run through `run_on_every_rank`; the message names that rank and its error."""


def run_on_every_rank(fn: Callable[[], T], what: str) -> list[T]:
    """Run `fn` on this rank; return every rank's result (indexed by rank), or, if any rank failed, raise on all.

    One all_gather_object after `fn` carries each rank's result or error message, so no rank waits in a barrier
    for one that has already died, and the error is known everywhere at once. The rank that failed re-raises its
    own exception (its type, e.g. InputError, keeps its exit code); the others raise RankFailedError naming the
    failed rank and its message. Results must be picklable. Without a group: [fn()].
    """
    if get_world_size() == 1:
        return [fn()]
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - reported to every rank below, then re-raised
        error = exc
    outcomes = all_gather_object((None, result) if error is None else (f"{type(error).__name__}: {error}", None))
    if error is not None:
        raise error
    failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RankFailedError(f"{what} failed on rank {rank}: {message}")
    return [value for _, value in outcomes]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from integers and strings, e.g. derive_seed(seed, "labeled", rank).

    Strings are hashed with CRC32 (stable across processes, unlike `hash`), then everything goes through
    numpy's SeedSequence, so nearby inputs give unrelated seeds.
    """
    words: list[int] = []
    for part in parts:
        if isinstance(part, str):
            words.append(zlib.crc32(part.encode("utf-8")))
        else:
            value = int(part)
            if value < 0:
                raise ValueError(f"derive_seed: negative part {value}")
            words.append(value)
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Endless, deterministic, per-rank stream of item indices (see the module docstring for the layout).

    Args:
        num_items: size of the dataset (> 0).
        seed: stream seed; each pass over the data ("epoch") e uses a permutation drawn from (seed, e).
        shuffle: False walks the items in order, epoch after epoch.
        rank, world_size: this process's share; default: the current process group (0 and 1 without one).
        batch_size: per-rank batch, so that each rank takes a contiguous block of positions per iteration.
        start: iteration (batch index) at which the stream starts; resume at iteration k with start=k.
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int = 1,
        start: int = 0,
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"InfiniteSampler needs at least one item, got {num_items}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")
        self.batch_size = int(batch_size)
        self.start = int(start)
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start the stream at the first iteration of pass `epoch` over the (global) data."""
        per_iteration = self.world_size * self.batch_size
        self.start = (int(epoch) * self.num_items) // per_iteration

    def set_start(self, iteration: int) -> None:
        """Start the stream at iteration `iteration` (resume)."""
        self.start = int(iteration)

    def permutation(self, epoch: int) -> np.ndarray:
        """Item order of pass `epoch` (int64 array of length num_items)."""
        if not self.shuffle:
            return np.arange(self.num_items, dtype=np.int64)
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
            self._perm = rng.permutation(self.num_items).astype(np.int64)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def item_at(self, position: int) -> int:
        """Item index at global stream position `position`."""
        epoch, offset = divmod(int(position), self.num_items)
        return int(self.permutation(epoch)[offset])

    def positions(self) -> Iterator[tuple[int, int]]:
        """Endless (global position, item index) pairs of this rank, from iteration `start` on."""
        iteration = self.start
        while True:
            first = (iteration * self.world_size + self.rank) * self.batch_size
            for position in range(first, first + self.batch_size):
                yield position, self.item_at(position)
            iteration += 1

    def __iter__(self) -> Iterator[int]:
        for _, item in self.positions():
            yield item
