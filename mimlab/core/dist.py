"""torch.distributed helpers for runs launched with ``torchrun`` (no home-made orchestration).

``torchrun --nproc_per_node=N -m mimlab.cli pretrain ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`init` reads them and creates the process group (gloo on CPU, nccl on CUDA). Without
those variables everything runs as a single process.
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from .errors import ConfigError


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str = "auto", timeout_s: float = 300.0) -> torch.device:
    """Initialise the process group when launched by torchrun; return this process's device.

    A rank that dies makes the others fail at the next collective after ``timeout_s`` instead
    of hanging forever (gloo/nccl timeouts).
    """
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        idx = int(device.split(":", 1)[1]) if ":" in device else 0
        if idx >= n:
            raise ConfigError(
                f"run.device={device}: "
                + (
                    "no CUDA GPU is available (torch sees none); use run.device=cpu or auto"
                    if n == 0
                    else f"this machine has {n} CUDA device(s) (cuda:0 .. cuda:{n - 1})"
                )
            )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not is_dist():
            backend = "nccl" if want_cuda else "gloo"
            local = int(os.environ.get("LOCAL_RANK", 0))
            if want_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if want_cuda:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not is_dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_object(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0 (a collective; every rank must call
    it), ``None`` on the other ranks; ``[obj]`` on one process. Used for per-rank state that a
    checkpoint must carry (each rank's RNG)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


@torch.no_grad()
def max_param_divergence(module: torch.nn.Module) -> float:
    """Largest |p_rank - p_rank0| over all parameters and ranks (0.0 when not distributed).

    DDP keeps replicas identical by construction; this checks it (cheap, once per run)."""
    if not is_dist():
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in module.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    d = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return float(d.item())


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    # auto: bf16 on GPUs that support it, full precision on CPU
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
