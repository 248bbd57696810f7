"""Golden values of mimlab's behaviour (the architecture issue's proof of preservation).

``python tests/golden/compute_golden.py OUT.json`` computes, with whatever ``mimlab`` is
importable, at the ``micro`` preset on a small generated ImageFolder with fixed seeds:

* every method preset's first 5 training losses;
* fine-tune, linear-probe and k-NN top-1 on the tiny set;
* CKA (masked vs full) values of one small configuration.

The committed ``golden.json`` was computed with the code of commit a33b153 (before the
redesign); ``tests/test_golden.py`` recomputes the values with today's code and compares them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        for c in range(4):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # a weak class signal under strong noise: accuracies stay informative (< 100 %)
                base = np.full((32, 32, 3), 60, np.int64)
                base[..., c % 3] += 6 + 4 * c
                img = np.clip(base + rng.integers(0, 140, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def presets() -> list[str]:
    from mimlab.core.config import METHOD_PRESETS

    return list(METHOD_PRESETS)


def compute(tmp: Path, methods: list[str] | None = None, losses_only: bool = False) -> dict:
    from mimlab import tasks
    from mimlab.core.config import FinetuneConfig, PretrainConfig, ProbeConfig, resolve

    torch.set_num_threads(1)
    data = make_data(tmp / "data")
    common = [
        f"data.path={data}",
        f"run.out_dir={tmp / 'runs'}",
        "data.num_workers=0",
        "run.progress=false",
        "model.preset=micro",
        "run.seed=0",
    ]
    out: dict = {"losses": {}, "skipped": {}}
    ckpt = None
    for m in methods or presets():
        ov = common + [
            f"run.name=pt-{m}",
            f"method.name={m}",
            "optim.epochs=1",
            "optim.batch_size=8",
            "run.log_every=1",
            "optim.warmup_epochs=0.5",
        ]
        if m == "maskdistill":
            ov.append("method.teacher_size=32")
        try:
            res = tasks.pretrain(resolve(PretrainConfig, overrides=ov))
        except Exception as e:  # noqa: BLE001 - recorded: a preset that cannot run here
            out["skipped"][m] = f"{type(e).__name__}: {e}"
            continue
        rows = [
            json.loads(x)
            for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            if x.strip()
        ]
        out["losses"][m] = [r["loss"] for r in rows if r.get("kind") == "train"][:5]
        if m == "mae":
            ckpt = res["checkpoint"]
    if losses_only:
        return out
    # adopting the checkpoint's model: resolve_run_config now, tasks.finetune/knn/linprobe before
    resolve_eval = getattr(tasks, "resolve_run_config", resolve)
    ft = tasks.finetune(
        resolve_eval(
            FinetuneConfig,
            overrides=common[:-2]
            + [
                "run.seed=0",
                f"finetune.pretrained={ckpt}",
                "run.name=ft",
                "optim.epochs=2",
                "optim.batch_size=8",
                "finetune.mixup=0",
                "finetune.cutmix=0",
                "optim.layer_decay=0.75",
            ],
        )
    )
    out["finetune_top1"] = ft["top1"]
    for kind in ("linprobe", "knn"):
        cfg = resolve_eval(
            ProbeConfig,
            overrides=common[:-2]
            + ["run.seed=0", f"probe.pretrained={ckpt}", f"run.name={kind}", "probe.epochs=3"],
        )
        out[f"{kind}_top1"] = getattr(tasks, kind)(cfg)["top1"]
    from mimlab.analysis.cka import analyze_cka

    analyze_cka(
        str(data),
        [ckpt],
        random_init=["micro"],
        images=16,
        batch=8,
        ratios=[0.25, 0.75],
        out=str(tmp / "cka"),
        seed=0,
        workers=0,
        progress=False,
    )
    import csv

    out["cka"] = {
        f"{r['model']}|{r['ratio']}|{r['block']}": float(r["cka"])
        for r in csv.DictReader((tmp / "cka" / "cka.csv").open())
    }
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        res = compute(Path(d))
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "cka"}, indent=1))
