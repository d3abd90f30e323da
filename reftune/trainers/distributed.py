"""Several processes, one run: data parallelism under `torchrun` or `accelerate launch`.

The launcher sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `init_distributed` joins the
process group (nccl on GPUs, gloo on CPU) and returns a `Dist` that the shared loop hands around.
With one process every method here is the identity, so single-process code paths stay as they were.

What the loop does with it (see `loop.py`):
- each rank samples and trains on its contiguous slice of the step's questions (the question order
  is a pure function of (step, seed), so no rank needs to be told its slice);
- batch statistics (advantage whitening, accuracy, KL, lengths, eval accuracy) are all-reduced;
- gradients: `ddp` wraps the policy (and value head) in DistributedDataParallel; `fsdp2` shards
  parameters, gradients and optimizer state with `fully_shard`, and rollouts then run on an
  unsharded replica that `sync_weights` refreshes after every update (generation takes a
  different number of forward passes on each rank, which sharded forwards cannot do);
- rank 0 writes checkpoints and logs; every rank resumes from them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from reftune.options import PARALLEL_MODES  # noqa: F401  (re-exported: the choices live with the config field)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "ddp"
    """How the model is wrapped when world_size > 1: ddp | fsdp2."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.enabled and self.mode == "fsdp2"

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a new tensor; `t` itself unchanged)."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        torch_dist.all_reduce(t)
        return t

    def sum_floats(self, *values: float) -> list[float]:
        """Sums over ranks of a few Python numbers, in one all-reduce."""
        if not self.enabled:
            return list(values)
        return self.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def slice(self, items: list, what: str) -> list:
        """This rank's contiguous share of `items`; the length must divide by the world size, so that
        every rank runs the same number of optimizer steps (and 1 x B equals W x B/W)."""
        if not self.enabled:
            return items
        if len(items) % self.world_size:
            raise ValueError(f"{what}: {len(items)} items do not split evenly over {self.world_size} processes")
        share = len(items) // self.world_size
        return items[self.rank * share:(self.rank + 1) * share]

    def uneven_slice(self, items: list) -> list:
        """This rank's share of `items` when sizes may differ by one (evaluation)."""
        if not self.enabled:
            return items
        return items[self.rank::self.world_size]

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(mode: str = "ddp") -> Dist:
    """Join the launcher's process group (once per process) or return the single-process Dist."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(mode=mode)
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), mode)


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK when the run asked for cuda."""
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def wrap(module: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """The module that training forwards and backwards go through. ddp: a DistributedDataParallel
    wrapper (same parameters); fsdp2: the module itself, sharded in place (each decoder layer a unit,
    then the root), so optimizers must be built after this."""
    if not dist.enabled:
        return module
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.local_rank] if next(module.parameters()).is_cuda else None
        return DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(module, "model", None), "layers", None)
    for layer in layers or []:
        fully_shard(layer)
    fully_shard(module)
    return module


@contextlib.contextmanager
def gradient_sync(modules, sync: bool):
    """Forwards and backwards of `modules` (their `wrap`s; None entries skipped) with their gradient
    all-reduce held back when not `sync`: ddp's `no_sync`, so the micro-batches before a
    mini-batch's last accumulate locally and the last backward reduces their sum. fsdp2 keeps
    reducing every backward (its reduce-scatter adds into the sharded gradients; holding it back
    would keep whole unsharded gradients, the memory that micro-batches are there to save)."""
    with contextlib.ExitStack() as stack:
        if not sync:
            for m in modules:
                if hasattr(m, "no_sync"):
                    stack.enter_context(m.no_sync())
        yield


def scalar(t) -> float:
    """A Python float of a 0-dim tensor, also of an fsdp2 DTensor (e.g. a clipped gradient norm)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def full_state_dict(module: torch.nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The whole, unsharded state dict (a collective under fsdp2: call it on every rank); None on
    ranks other than 0 under fsdp2."""
    module = unwrap(module)
    if not dist.sharded:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main else None


def optimizer_state(module, optimizer, dist: Dist) -> dict | None:
    """The optimizer state to checkpoint: rank 0's (identical on every rank under ddp), or the whole
    gathered state under fsdp2 (a collective). `module`: every module whose parameters the
    optimizer steps (e.g. a ModuleList of the policy and the value head)."""
    if not dist.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(module, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main else None


def load_optimizer_state(module, optimizer, state: dict, dist: Dist) -> None:
    if not dist.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def copy_into(replica: torch.nn.Module, module: torch.nn.Module, dist: Dist) -> None:
    """Refresh an unsharded replica from the (sharded) trained module, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(unwrap(module), options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=False))
    with torch.no_grad():
        replica.load_state_dict(state)
