"""Training-step benchmark: mimlab against a reference model of identical configuration.

Times full steps (forward + backward + AdamW step) in one process, alternating mimlab and the
reference so both see the same machine state, and prints images/s for both and their ratio
(median over repetitions). References: HuggingFace ``transformers`` ``ViTMAEForPreTraining``
for MAE pretraining, timm ``VisionTransformer`` for fine-tuning. With ``--official-mae DIR``
(or the environment variable ``MIMLAB_OFFICIAL_MAE``: a checkout of
github.com/facebookresearch/mae, which is not part of mimlab and is imported from there at run
time) the MAE step is also timed against the official ``models_mae.MaskedAutoencoderViT`` in the
same alternation, and the ratio to the faster of the two peers is reported. Also FLOPs per image
(``torch.utils.flop_counter``) and achieved GFLOP/s as a fraction of this machine's fp32
matrix-multiply peak measured in the same run.

    python benchmarks/bench_train.py --preset tiny --batch 128
    python benchmarks/bench_train.py --preset vit_b16 --batch 16 --reps 3
    python benchmarks/bench_train.py --what mae --compile     # mimlab under torch.compile
    python benchmarks/bench_train.py --preset vit_b16 --batch 16 --what mae \
        --official-mae ~/src/mae           # also the official MAE code (HF + official)
    python benchmarks/bench_train.py --preset vit_b16 --batch 16 --what mae \
        --checkpointing selective,full    # also time model.grad_checkpointing modes
    python benchmarks/bench_train.py --device cuda --precision bf16 --preset vit_b16 \
        --batch 256 --what mae --compile  # GPU: bf16 autocast, fused AdamW, SDPA (flash)

On a GPU the step ends with a device synchronisation (so the timings are of finished work),
AdamW is the fused CUDA kernel, and the peak is the best matmul of the step's precision on that
device measured in the same run: fraction_of_peak is then the model-FLOPs utilisation against
the achieved (not the datasheet) peak.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from mimlab.core.config import CHECKPOINTING, PretrainConfig, resolve
from mimlab.methods import build_method
from mimlab.nn.models import build_encoder
from mimlab.tasks import Classifier

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(
    n: int = 2048, reps: int = 5, dtype=torch.float32, device: str = "cpu"
) -> float:
    """Best GEMM throughput (GFLOP/s) of ``device`` in ``dtype``, measured now."""
    dev = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    a @ b
    sync(dev)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def hf_mae(cfg):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    m = cfg.model
    c = ViTMAEConfig(
        hidden_size=m.embed_dim,
        num_hidden_layers=m.depth,
        num_attention_heads=m.num_heads,
        intermediate_size=int(m.embed_dim * m.mlp_ratio),
        image_size=m.img_size,
        patch_size=m.patch_size,
        num_channels=m.in_chans,
        qkv_bias=True,
        decoder_hidden_size=m.decoder_embed_dim,
        decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_num_heads,
        decoder_intermediate_size=int(m.decoder_embed_dim * m.mlp_ratio),
        mask_ratio=cfg.method.mask_ratio,
        norm_pix_loss=cfg.method.target_norm == "patch",
        attn_implementation="sdpa",
    )
    return ViTMAEForPreTraining(c)


#: where the official MAE code is found when ``--official-mae`` is not given
OFFICIAL_ENV = "MIMLAB_OFFICIAL_MAE"
OFFICIAL_NAME = "facebookresearch/mae models_mae.MaskedAutoencoderViT"
OFFICIAL_ABSENT = (
    f"official MAE not measured: no --official-mae DIR (or {OFFICIAL_ENV}) naming a checkout "
    "of github.com/facebookresearch/mae"
)


def _block_without_qk_scale(*args, qk_scale=None, **kwargs) -> nn.Module:
    """Compatibility shim for the official MAE code, which builds
    ``Block(dim, heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=...)`` against
    timm 0.3.2. Today's timm ``Block`` (1.0) takes no ``qk_scale``: its attention scale is
    always ``head_dim ** -0.5``, which is what ``qk_scale=None`` meant, so the keyword is
    dropped; any other value would change the model and is refused."""
    if qk_scale is not None:
        raise ValueError(f"qk_scale={qk_scale!r}: timm's Block has no such option any more")
    return Block(*args, **kwargs)


@contextlib.contextmanager
def _numpy_float_alias():
    """Compatibility shim: the official ``util/pos_embed.py`` uses ``np.float`` (an alias of
    ``float`` removed in numpy 1.24) when the model is built; provide the alias meanwhile."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


def load_official_mae(directory) -> "object":
    """Import ``models_mae`` (and the ``util`` package it imports) from ``directory``, a
    checkout of github.com/facebookresearch/mae, without leaving it on ``sys.path`` or its
    ``util`` in ``sys.modules``; its ``Block`` is replaced by :func:`_block_without_qk_scale`.
    Raises ``FileNotFoundError`` (one line) if ``directory`` has no ``models_mae.py``."""
    d = Path(directory).expanduser().resolve()
    if not (d / "models_mae.py").is_file():
        raise FileNotFoundError(
            f"--official-mae {directory}: no models_mae.py there (expected a checkout of "
            "github.com/facebookresearch/mae)"
        )
    names = [k for k in sys.modules if k == "util" or k.startswith("util.")]
    saved = {k: sys.modules.pop(k) for k in names}  # another package named util, if any
    sys.path.insert(0, str(d))
    try:
        spec = importlib.util.spec_from_file_location("official_models_mae", d / "models_mae.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(d))
        for k in [k for k in sys.modules if k == "util" or k.startswith("util.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    mod.Block = _block_without_qk_scale  # the module looks its Block up when a model is built
    return mod


def official_commit(directory) -> Optional[str]:
    """The git commit of ``directory`` when it is the top of a git checkout (provenance of the
    official figures), else None (for example a ``git archive`` export)."""
    d = Path(directory).expanduser().resolve()
    try:
        p = subprocess.run(
            ["git", "-C", str(d), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = p.stdout.split()
    if p.returncode != 0 or len(out) != 2 or Path(out[0]).resolve() != d:
        return None
    return out[1]


def official_mae(cfg, directory) -> nn.Module:
    """The official ``MaskedAutoencoderViT`` with ``cfg``'s model (as mimlab's preset: widths,
    depths, heads, LayerNorm eps 1e-6 as in the official ViT-B/L/H builders) and
    ``norm_pix_loss`` as mimlab's MAE target normalisation."""
    m = cfg.model
    mod = load_official_mae(directory)
    with _numpy_float_alias():
        return mod.MaskedAutoencoderViT(
            img_size=m.img_size,
            patch_size=m.patch_size,
            in_chans=m.in_chans,
            embed_dim=m.embed_dim,
            depth=m.depth,
            num_heads=m.num_heads,
            decoder_embed_dim=m.decoder_embed_dim,
            decoder_depth=m.decoder_depth,
            decoder_num_heads=m.decoder_num_heads,
            mlp_ratio=m.mlp_ratio,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            norm_pix_loss=cfg.method.target_norm == "patch",
        )


def timm_vit(cfg, num_classes=10):
    import timm

    m = cfg.model
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=m.img_size,
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        in_chans=m.in_chans,
        num_classes=num_classes,
        global_pool="avg",
        drop_path_rate=0.1,
    )


def make_step(model, loss_fn, x, y=None, foreach=True, amp=None):
    """One training step on ``x``'s device: forward (under autocast to ``amp`` if given),
    backward, AdamW (the fused kernel on CUDA), then a device synchronisation."""
    dev = x.device
    opt_kw = {"fused": True} if dev.type == "cuda" else {"foreach": foreach}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), **opt_kw)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        sync(dev)

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


def time_pair(steps: dict, reps: int, warmup: int = 1, raw: Optional[dict] = None) -> dict:
    """Median seconds per step of each of ``steps`` (name -> step function), run alternately
    ``reps`` times after ``warmup`` runs each, each round starting one step later than the last
    (no step always runs right after the same other one); ``raw`` (a dict) receives every
    timing, in the order of the rounds."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict = {k: [] for k in steps}
    names = list(steps)
    for i in range(reps):
        s = i % len(names)
        for k in names[s:] + names[:s]:  # alternate: same machine state for all
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    if raw is not None:
        raw.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(
    preset: str,
    batch: int,
    reps: int,
    what: str,
    peak_size: int = 2048,
    compile_: bool = False,
    checkpointing: tuple = (),
    device: str = "cpu",
    precision: str = "fp32",
    official: Optional[str] = None,
) -> dict:
    """One step kind (``what``: mae | finetune) of mimlab against its reference, both on
    ``device`` under the same autocast ``precision``. With ``checkpointing`` (modes of
    ``model.grad_checkpointing``, MAE only) mimlab's step is also timed with each mode, in the
    same alternation, as ``checkpointing_img_s``. For MAE, ``official`` (a checkout of
    facebookresearch/mae) adds the official model to the alternation, at the same batch and
    mask ratio: ``official_img_s``, ``ratio_official`` and, against the faster of HF and the
    official code, ``peer_name``, ``peer_img_s``, ``ratio_peer``; without it
    ``official_img_s`` is None and ``official_absent`` says why."""
    dev, amp = torch.device(device), PRECISIONS[precision]
    torch.manual_seed(0)
    cfg = resolve(PretrainConfig, overrides=[f"model.preset={preset}"])
    m = cfg.model
    x = torch.randn(batch, m.in_chans, m.img_size, m.img_size, device=dev)
    res = {
        "bench": "train",
        "preset": preset,
        "batch": batch,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "what": what,
        "compile": compile_,
        "device": device,
        "precision": precision,
    }
    if dev.type == "cuda":
        res["device_name"] = torch.cuda.get_device_name(dev)

    def step_of(model, loss_fn, y=None):
        return make_step(model, loss_fn, x, y, amp=amp)

    def counted(fn):  # FLOPs of one forward + backward, under the step's autocast
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            return flops_per_image(fn, batch)

    if what == "mae":
        ours = build_method(cfg).to(dev)
        ref = hf_mae(cfg).to(dev)
        y = None
        ours_loss = lambda mod, a, b: mod(a)["loss"]  # noqa: E731
        steps = {
            "mimlab": step_of(ours, ours_loss),
            "reference": step_of(ref, lambda mod, a, b: mod(pixel_values=a).loss),
        }
        fl = counted(lambda: ours(x)["loss"].backward())
        res["reference_name"] = "transformers.ViTMAEForPreTraining"
        res["official_name"] = OFFICIAL_NAME
        if official:
            torch.manual_seed(0)
            ratio = cfg.method.mask_ratio
            steps["official"] = step_of(
                official_mae(cfg, official).to(dev), lambda mod, a, b: mod(a, ratio)[0]
            )
            res["official_dir"] = str(official)
            res["official_commit"] = official_commit(official)
        else:
            res["official_absent"] = OFFICIAL_ABSENT
        for mode in checkpointing:
            torch.manual_seed(0)
            mc = build_method(
                resolve(
                    PretrainConfig,
                    overrides=[f"model.preset={preset}", f"model.grad_checkpointing={mode}"],
                )
            ).to(dev)
            steps[f"mimlab+{mode}"] = step_of(mc, ours_loss)
    else:
        y = torch.randint(0, 10, (batch,), device=dev)
        ours = Classifier(build_encoder(m, mask_token=False, drop_path=0.1), 10).to(dev)
        ref = timm_vit(cfg).to(dev)
        ce = lambda logits, t: F.cross_entropy(logits, t)  # noqa: E731
        ours_loss = lambda mod, a, b: mod(a, b)["loss"]  # noqa: E731
        steps = {
            "mimlab": step_of(ours, ours_loss, y),
            "reference": step_of(ref, lambda mod, a, b: ce(mod(a), b), y),
        }
        fl = counted(lambda: ours(x, y)["loss"].backward())
        res["reference_name"] = "timm.VisionTransformer"
    if compile_:  # mimlab's model under torch.compile (inductor); the reference stays eager
        t0 = time.perf_counter()
        steps["mimlab"] = step_of(torch.compile(ours), ours_loss, y)
        steps["mimlab"]()  # compiles forward and backward
        res["compile_seconds"] = time.perf_counter() - t0
    raw: dict = {}
    res["load_average_before"] = list(os.getloadavg())  # 1, 5, 15 min: others' work too
    t = time_pair(steps, reps, raw=raw)
    res["load_average_after"] = list(os.getloadavg())
    res["step_seconds"] = raw  # every repetition, in the order run (noise on a busy machine)
    peak = matmul_peak_gflops(peak_size, dtype=amp or torch.float32, device=device)
    res.update(
        {
            "mimlab_img_s": batch / t["mimlab"],
            "reference_img_s": batch / t["reference"],
            "ratio": t["reference"] / t["mimlab"],
            "gflops_per_image": fl / 1e9,
            "mimlab_gflop_s": fl * batch / t["mimlab"] / 1e9,
            "matmul_peak_gflop_s": peak,
        }
    )
    res["fraction_of_peak"] = res["mimlab_gflop_s"] / peak
    if what == "mae":
        res["official_img_s"] = batch / t["official"] if "official" in t else None
        peers = {"reference": res["reference_name"]}
        if "official" in t:
            res["ratio_official"] = t["official"] / t["mimlab"]
            peers["official"] = OFFICIAL_NAME
        fastest = min(peers, key=lambda k: t[k])
        res["peer_name"] = peers[fastest]
        res["peer_img_s"] = batch / t[fastest]
        res["ratio_peer"] = t[fastest] / t["mimlab"]
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
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--what", choices=["mae", "finetune", "both"], default="both")
    ap.add_argument(
        "--peak-size",
        type=int,
        default=2048,
        help="matrix size of the matmul-peak measurement (8192 suits a GPU)",
    )
    ap.add_argument("--json", help="append results as JSON lines to this file")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="time mimlab's model under torch.compile (reference stays eager)",
    )
    ap.add_argument(
        "--official-mae",
        metavar="DIR",
        default=os.environ.get(OFFICIAL_ENV) or None,
        help="a checkout of github.com/facebookresearch/mae: its models_mae is imported from "
        f"there and timed in the MAE step's alternation (default: ${OFFICIAL_ENV}; without "
        "it the official column is reported as not measured)",
    )
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="autocast precision of both steps (the matmul peak is measured in it)",
    )
    ap.add_argument(
        "--checkpointing",
        default="",
        help="comma list of model.grad_checkpointing modes (selective, full) whose "
        "MAE step is timed too, alternated with the others",
    )
    a = ap.parse_args()
    modes = tuple(m.strip() for m in a.checkpointing.split(",") if m.strip())
    timed = [m for m in CHECKPOINTING if m != "off"]  # off is the plain mimlab step
    bad = [m for m in modes if m not in timed]
    if bad:
        ap.error(f"--checkpointing: unknown mode(s) {', '.join(bad)} ({', '.join(timed)})")
    try:
        dev = torch.device(a.device)
    except RuntimeError as e:
        ap.error(f"--device {a.device}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: no CUDA device is available to this torch")
    whats = ["mae", "finetune"] if a.what == "both" else [a.what]
    if a.official_mae and "mae" in whats:
        try:  # a wrong directory stops here, in one line, before any timing
            load_official_mae(a.official_mae)
        except FileNotFoundError as e:
            ap.error(str(e))
    where = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(f"# {where}, torch {torch.__version__}, {torch.get_num_threads()} threads, {a.precision}")
    if a.compile:
        cold_compiles()
    # lower precision only pays where the CPU has bf16 matrix units (AVX512-BF16 / AMX); once
    # per run, at most 512x512 on CPU: without bf16 units it runs ~100x slower than fp32 there
    bf16_peak = matmul_peak_gflops(
        a.peak_size if dev.type == "cuda" else min(a.peak_size, 512),
        reps=3,
        dtype=torch.bfloat16,
        device=a.device,
    )
    for w in whats:
        r = bench(
            a.preset,
            a.batch,
            a.reps,
            w,
            a.peak_size,
            a.compile,
            modes,
            a.device,
            a.precision,
            a.official_mae,
        )
        r["matmul_peak_bf16_gflop_s"] = bf16_peak
        tag = " (compiled, %.0f s to compile)" % r["compile_seconds"] if a.compile else ""
        if a.device != "cpu" or a.precision != "fp32":
            tag += f" [{a.device}, {a.precision}]"
        print(
            f"{w:9s} {a.preset:8s} batch {a.batch:4d}: mimlab{tag} "
            f"{r['mimlab_img_s']:8.1f} img/s | "
            f"{r['reference_name']} {r['reference_img_s']:8.1f} img/s | ratio "
            f"{r['ratio']:.2f}x | {r['gflops_per_image']:.2f} GFLOP/img, "
            f"{r['mimlab_gflop_s']:.0f} GFLOP/s = {100 * r['fraction_of_peak']:.0f}% of "
            f"{r['matmul_peak_gflop_s']:.0f} GFLOP/s {a.precision} matmul peak"
        )
        if w == "mae":
            head = f"{w:9s} {a.preset:8s} batch {a.batch:4d}:"
            if r["official_img_s"] is None:
                print(f"{head} {r['official_absent']}")
            else:
                print(
                    f"{head} official MAE {r['official_img_s']:8.1f} img/s | mimlab / official "
                    f"{r['ratio_official']:.2f}x | mimlab / faster peer ({r['peer_name']}) "
                    f"{r['ratio_peer']:.2f}x"
                )
        for mode, v in r.get("checkpointing_img_s", {}).items():
            print(
                f"{w:9s} {a.preset:8s} batch {a.batch:4d}: mimlab with "
                f"model.grad_checkpointing={mode} {v:8.1f} img/s = "
                f"{v / r['mimlab_img_s']:.2f}x of mimlab without checkpointing"
            )
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
