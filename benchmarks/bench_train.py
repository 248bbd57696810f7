"""Training-step benchmark: mimlab against a reference model of identical configuration.

Times full steps (forward + backward + AdamW step) in one process, alternating mimlab and the
reference so both see the same machine state, and prints images/s for both and their ratio
(median over repetitions). References: HuggingFace ``transformers`` ``ViTMAEForPreTraining``
for MAE pretraining, timm ``VisionTransformer`` for fine-tuning. Also FLOPs per image
(``torch.utils.flop_counter``) and achieved GFLOP/s as a fraction of this machine's fp32
matrix-multiply peak measured in the same run.

    python benchmarks/bench_train.py --preset tiny --batch 128
    python benchmarks/bench_train.py --preset vit_b16 --batch 16 --reps 3
    python benchmarks/bench_train.py --what mae --compile     # mimlab under torch.compile
    python benchmarks/bench_train.py --preset vit_b16 --batch 16 --what mae \
        --checkpointing selective,full    # also time model.grad_checkpointing modes
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from mimlab.config import PretrainConfig, resolve
from mimlab.methods import build_method
from mimlab.models import build_encoder
from mimlab.tasks import Classifier


def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype=torch.float32) -> float:
    """Best GEMM throughput of this machine (GFLOP/s) in ``dtype``, measured now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def hf_mae(cfg):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    m = cfg.model
    c = ViTMAEConfig(hidden_size=m.embed_dim, num_hidden_layers=m.depth,
                     num_attention_heads=m.num_heads, intermediate_size=int(m.embed_dim * m.mlp_ratio),
                     image_size=m.img_size, patch_size=m.patch_size, num_channels=m.in_chans,
                     qkv_bias=True, decoder_hidden_size=m.decoder_embed_dim,
                     decoder_num_hidden_layers=m.decoder_depth,
                     decoder_num_attention_heads=m.decoder_num_heads,
                     decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio),
                     mask_ratio=cfg.method.mask_ratio, norm_pix_loss=cfg.method.norm_pix_loss,
                     attn_implementation="sdpa")
    return ViTMAEForPreTraining(c)


def timm_vit(cfg, num_classes=10):
    import timm
    m = cfg.model
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=m.img_size,
                             patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                             num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, in_chans=m.in_chans,
                             num_classes=num_classes, global_pool="avg", drop_path_rate=0.1)


def make_step(model, loss_fn, x, y=None, foreach=True):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=foreach)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
    return step


def mimlab_mae_step(preset: str, batch: int, overrides=(), foreach: bool = True):
    """One full mimlab MAE training step (forward, backward, AdamW) on a fixed random batch,
    as used by ``bench_data.py`` (training rate) and ``bench_memory.py`` (peak RSS).
    Returns ``(step, method, cfg)``."""
    torch.manual_seed(0)
    cfg = resolve(PretrainConfig, overrides=[f"model.preset={preset}", *overrides])
    m = cfg.model
    x = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
    method = build_method(cfg)
    return make_step(method, lambda mod, a, b: mod(a)["loss"], x, foreach=foreach), method, cfg


def flops_per_image(fn, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / batch


def time_pair(steps: dict, reps: int, warmup: int = 1) -> dict:
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, fn in steps.items():  # alternate: same machine state for both
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(preset: str, batch: int, reps: int, what: str, peak_size: int = 2048,
          compile_: bool = False, checkpointing: tuple = ()) -> dict:
    """One step kind (``what``: mae | finetune) of mimlab against its reference. With
    ``checkpointing`` (modes of ``model.grad_checkpointing``, MAE only) mimlab's step is also
    timed with each mode, in the same alternation, as ``checkpointing_img_s``."""
    torch.manual_seed(0)
    cfg = resolve(PretrainConfig, overrides=[f"model.preset={preset}"])
    m = cfg.model
    x = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
    res = {"bench": "train", "preset": preset, "batch": batch, "reps": reps,
           "threads": torch.get_num_threads(), "what": what, "compile": compile_}
    if what == "mae":
        ours = build_method(cfg)
        ref = hf_mae(cfg)
        steps = {"mimlab": make_step(ours, lambda mod, a, b: mod(a)["loss"], x),
                 "reference": make_step(ref, lambda mod, a, b: mod(pixel_values=a).loss, x)}
        fl = flops_per_image(lambda: ours(x)["loss"].backward(), batch)
        res["reference_name"] = "transformers.ViTMAEForPreTraining"
        for mode in checkpointing:
            torch.manual_seed(0)
            mc = build_method(resolve(PretrainConfig, overrides=[
                f"model.preset={preset}", f"model.grad_checkpointing={mode}"]))
            steps[f"mimlab+{mode}"] = make_step(mc, lambda mod, a, b: mod(a)["loss"], x)
    else:
        y = torch.randint(0, 10, (batch,))
        ours = Classifier(build_encoder(m, mask_token=False, drop_path=0.1), 10)
        ref = timm_vit(cfg)
        ce = lambda logits, t: F.cross_entropy(logits, t)  # noqa: E731
        steps = {"mimlab": make_step(ours, lambda mod, a, b: mod(a, b)["loss"], x, y),
                 "reference": make_step(ref, lambda mod, a, b: ce(mod(a), b), x, y)}
        fl = flops_per_image(lambda: ours(x, y)["loss"].backward(), batch)
        res["reference_name"] = "timm.VisionTransformer"
    if compile_:  # mimlab's model under torch.compile (inductor); the reference stays eager
        t0 = time.perf_counter()
        cm = torch.compile(ours)
        if what == "mae":
            steps["mimlab"] = make_step(cm, lambda mod, a, b: mod(a)["loss"], x)
        else:
            steps["mimlab"] = make_step(cm, lambda mod, a, b: mod(a, b)["loss"], x, y)
        steps["mimlab"]()  # compiles forward and backward
        res["compile_seconds"] = time.perf_counter() - t0
    t = time_pair(steps, reps)
    peak = matmul_peak_gflops(peak_size)
    res.update({
        "mimlab_img_s": batch / t["mimlab"], "reference_img_s": batch / t["reference"],
        "ratio": t["reference"] / t["mimlab"], "gflops_per_image": fl / 1e9,
        "mimlab_gflop_s": fl * batch / t["mimlab"] / 1e9, "matmul_peak_gflop_s": peak})
    res["fraction_of_peak"] = res["mimlab_gflop_s"] / peak
    if what == "mae" and checkpointing:
        res["checkpointing_img_s"] = {m: batch / t[f"mimlab+{m}"] for m in checkpointing}
    return res


def cold_compiles() -> None:
    """Time cold compiles, not hits in inductor's on-disk cache left by an earlier run."""
    try:
        import torch._inductor.config as inductor_config
        inductor_config.force_disable_caches = True
    except (ImportError, AttributeError):  # pragma: no cover - other torch versions
        return
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--what", choices=["mae", "finetune", "both"], default="both")
    ap.add_argument("--peak-size", type=int, default=2048,
                    help="matrix size of the fp32 matmul-peak measurement")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    ap.add_argument("--compile", action="store_true",
                    help="time mimlab's model under torch.compile (reference stays eager)")
    ap.add_argument("--checkpointing", default="",
                    help="comma list of model.grad_checkpointing modes (selective, full) whose "
                    "MAE step is timed too, alternated with the others")
    a = ap.parse_args()
    modes = tuple(m.strip() for m in a.checkpointing.split(",") if m.strip())
    bad = [m for m in modes if m not in ("selective", "full")]
    if bad:
        ap.error(f"--checkpointing: unknown mode(s) {', '.join(bad)} (selective, full)")
    whats = ["mae", "finetune"] if a.what == "both" else [a.what]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if a.compile:
        cold_compiles()
    # lower precision only pays where the CPU has bf16 matrix units (AVX512-BF16 / AMX); once
    # per run, at most 512x512: without bf16 units it runs ~100x slower than fp32 here
    bf16_peak = matmul_peak_gflops(min(a.peak_size, 512), reps=3, dtype=torch.bfloat16)
    for w in whats:
        r = bench(a.preset, a.batch, a.reps, w, a.peak_size, a.compile, modes)
        r["matmul_peak_bf16_gflop_s"] = bf16_peak
        tag = " (compiled, %.0f s to compile)" % r["compile_seconds"] if a.compile else ""
        print(f"{w:9s} {a.preset:8s} batch {a.batch:4d}: mimlab{tag} {r['mimlab_img_s']:8.1f} img/s | "
              f"{r['reference_name']} {r['reference_img_s']:8.1f} img/s | ratio "
              f"{r['ratio']:.2f}x | {r['gflops_per_image']:.2f} GFLOP/img, "
              f"{r['mimlab_gflop_s']:.0f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of "
              f"{r['matmul_peak_gflop_s']:.0f} GFLOP/s matmul peak")
        for mode, v in r.get("checkpointing_img_s", {}).items():
            print(f"{w:9s} {a.preset:8s} batch {a.batch:4d}: mimlab with "
                  f"model.grad_checkpointing={mode} {v:8.1f} img/s = "
                  f"{v / r['mimlab_img_s']:.2f}x of mimlab without checkpointing")
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
