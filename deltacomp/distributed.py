"""Several processes of one host share a compression (``torchrun --nproc-per-node N``): who does which matrix.

:func:`world` reads the launcher's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` and joins the process group (gloo
when the work runs on the CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``); without them it is one process
and nothing is initialised. The compressible matrices are shared by :func:`assign`, a fixed rule every rank
computes alike: largest first, each to the rank with the least work so far (ties by name, then by rank). Results
travel through the output's partial folder (:mod:`deltacomp.resume`), not through the process group, which only
carries a path, a barrier and a few strings: the ranks must share the output's filesystem (one host).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import sys
from dataclasses import dataclass

from deltacomp.errors import DeltacompError

log = logging.getLogger(__name__)

# a rank may wait long for the others (``--sequential`` runs on rank 0 alone): the group's timeout covers a whole run
TIMEOUT = _dt.timedelta(hours=24)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device of this rank for the configured ``device``: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if self.size == 1 or device == "cpu":
            return device
        if device != "cuda":
            raise DeltacompError(f"--device {device}: under torchrun give --device cuda; rank r takes cuda:LOCAL_RANK")
        return f"cuda:{self.local_rank}"

    def broadcast(self, value):
        """Rank 0's ``value`` (a small picklable object) on every rank."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_all(self, error: BaseException | None) -> None:
        """A collective: every rank says whether its share failed; each raises if any did, naming the ranks."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        said = [None] * self.size
        dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(said) if m is not None]
        if failed:
            raise DeltacompError("; ".join(f"rank {r} failed ({m})" for r, m in failed))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DeltacompError(f"{name}={value!r}: expected an integer (set by torchrun)") from None


def is_main_process() -> bool:
    """Whether this process is rank 0 of its launcher's group (or alone): the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def world(device: str = "cpu") -> World:
    """This process's place among the launcher's processes (one process when no launcher set ``WORLD_SIZE``)."""
    size = _env_int("WORLD_SIZE")
    if size is None or size == 1:
        return World()
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None:
        raise DeltacompError("WORLD_SIZE is set but RANK is not: launch with torchrun")
    local = rank if local is None else local
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(_leave)
        log.info("rank %d of %d joined the %s process group", rank, size, backend)
    if dist.get_world_size() != size:
        raise DeltacompError(f"WORLD_SIZE={size} but the process group has {dist.get_world_size()} processes")
    return World(rank, size, local)


def _leave() -> None:
    """Leave the process group together before the interpreter exits: a barrier, so that no rank closes its
    connections while another still uses them, then destroy the group. Left to the interpreter's teardown, a rank
    whose peer has already gone can abort in the backend's threads ("terminate called without an active
    exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process of a launched command with ``code``: when it joined a process group, leave it (:func:`_leave`),
    flush the output and exit at once, so the backend's C++ objects are never torn down at interpreter exit, where
    a thread still joinable aborts the process after its work is done; otherwise a plain ``sys.exit``."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    _leave()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def assign(sizes: dict[str, int], ranks: int) -> dict[str, int]:
    """The rank of each name: largest first, each to the least loaded rank so far (ties: name, then rank)."""
    load = [0] * ranks
    owner = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(ranks), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += sizes[name]
    return owner
