"""Worker of tests/test_ddp.py::test_siamese_losses_under_ddp_equal_one_process (run by
``torchrun --nproc_per_node=2``; not collected by pytest). Every rank first computes, in one
process, the loss and gradients of each C-MAE variant on the *global* batch (before the process
group exists), then joins the gloo group, runs the same variant under DistributedDataParallel
on its half of the batch, and rank 0 writes the differences to the JSON file ``argv[1]``."""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mimlab.core.config import PretrainConfig, resolve
from mimlab.methods import build_method
from mimlab.nn.ops import random_masking

CASES = {
    "position": [],
    "batch_chunked": ["method.negatives=batch", "method.nce_chunk=5"],
    "image_removed": ["method.negatives=image", "method.queries=removed"],
    "patch_cls": ["method.name=cmae_patch_cls"],
    "cls": ["method.name=cmae_cls"],
    "byol": ["method.name=cmae_byol"],
    "independent": ["method.view2=independent", "method.queries=removed"],
}
G, N = 8, 16  # global batch, patches of the micro model


def make(overrides):
    ov = ["model.preset=micro", "method.name=cmae", *overrides, "method.color_jitter=none"]
    torch.manual_seed(0)
    m = build_method(resolve(PretrainConfig, overrides=ov))
    return m.train()


def run(m, images, m1, m2):
    out = m(images, mask1=m1, mask2=m2)
    out["loss"].backward()
    mod = m.module if isinstance(m, DDP) else m
    grads = {n: p.grad.detach().clone() for n, p in mod.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


def main(path: str) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(G, 3, 32, 32, generator=g)
    m1 = random_masking(torch.rand(G, N, generator=g), 0.75)[1]
    m2i = random_masking(torch.rand(G, N, generator=g), 0.25)[1]
    single, halves = {}, {}
    for name, ov in CASES.items():
        m2 = m2i if name == "independent" else None
        single[name] = run(make(ov), images, m1, m2)
        # control: the two halves alone (what per-process negatives / BN statistics give)
        halves[name] = (
            sum(
                float(run(make(ov), images[s], m1[s], None if m2 is None else m2[s])[0])
                for s in (slice(0, G // 2), slice(G // 2, G))
            )
            / 2
        )
    dist.init_process_group("gloo")
    r, W = dist.get_rank(), dist.get_world_size()
    sl = slice(r * G // W, (r + 1) * G // W)
    report = {}
    for name, ov in CASES.items():
        m2 = m2i if name == "independent" else None
        loss, grads = run(DDP(make(ov)), images[sl], m1[sl], None if m2 is None else m2[sl])
        mean = loss.clone()
        dist.all_reduce(mean)
        ref_loss, ref_grads = single[name]
        report[name] = {
            "world": W,
            "loss_ddp": float(mean) / W,
            "loss_single": float(ref_loss),
            "loss_halves": halves[name],
            "max_grad_diff": max(float((grads[k] - ref_grads[k]).abs().max()) for k in ref_grads),
            "max_grad": max(float(v.abs().max()) for v in ref_grads.values()),
            "same_params": sorted(grads) == sorted(ref_grads),
        }
    if r == 0:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
