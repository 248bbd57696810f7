"""``mimlab bench``: run the benchmark scripts and write a markdown performance report.

A repository tool, not part of the installed package: ``mimlab bench`` loads this file from the
checkout's ``benchmarks/`` folder. The measurements live beside it (``bench_train.py``,
``bench_data.py``, ``bench_memory.py``) and the speed targets in ``targets.json``; this module
only plans their command lines, runs each as a subprocess
(one after the other, never overlapping) with ``--json FILE``, collects the JSON lines and
writes the report: date, machine (CPU model, cores, memory, load average), versions (python,
torch, torchvision, timm, transformers, mimlab and its git commit), the commands, the result
tables and the console output. A raw copy of everything goes next to the report (``.json``).

Full run (tiny: MAE + fine-tune steps at batch 128, eager and under torch.compile; vit_b16:
MAE steps at batch 16; data pipeline on CIFAR-10 and a generated 224 px folder; peak RSS of
tiny@128, vit_b16@16, vit_b16@64 without and with selective and full activation
checkpointing, whose step-time cost the vit_b16 training step also measures) takes several
minutes on a small CPU machine; ``--quick`` is a smoke run with small batches and single
repetitions whose numbers are not meant to be quoted. The MAE steps are also timed against the
official facebookresearch/mae code when ``MIMLAB_OFFICIAL_MAE`` names a checkout of it (the
scripts inherit the environment; see ``bench_train.py --official-mae``); otherwise the report
says that column was not measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

from mimlab import __version__
from mimlab.core.config import checkpointing_mode

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("train", "data", "memory")
DEFAULT_OUT = "docs/performance.md"
GPU_OUT = "docs/performance-gpu.md"


def load_targets(path: Path = HERE / "targets.json") -> tuple[dict, float]:
    """``targets.json``: the CPU speed targets, (step, preset) -> minimum ratio reference step
    time / mimlab step time, and the published ViT-B/16 MAE images/s per GPU that ``--gpu``
    compares with."""
    d = json.loads(path.read_text())
    return (
        {(t["step"], t["preset"]): float(t["min_ratio"]) for t in d["cpu_targets"]},
        float(d["gpu_reference_img_s"]),
    )


#: CPU speed targets and the published GPU figure, from ``targets.json``
TARGETS, GPU_REFERENCE_IMG_S = load_targets()
#: ViT-B/16 MAE batch per GPU in the ``--gpu`` plan (the published fast-MAE pipelines' scale)
GPU_BATCH = 256


@dataclass
class Step:
    """One benchmark command: ``python benchmarks/<script> <args> --json FILE``."""

    name: str
    kind: str  # train | data | memory
    script: str
    args: list[str] = field(default_factory=list)

    def argv(self, json_file: Optional[str] = None) -> list[str]:
        tail = ["--json", json_file] if json_file else []
        return [sys.executable, str(benchmarks_dir() / self.script), *self.args, *tail]

    def shown(self) -> str:
        """The command as a user would type it from the repository root."""
        return " ".join(
            [
                "python",
                f"benchmarks/{self.script}",
                *map(shlex.quote, self.args),
                "--json",
                "results.jsonl",
            ]
        )


def benchmarks_dir() -> Path:
    """This folder (the benchmark scripts beside this file)."""
    return HERE


def plan(
    quick: bool = False, only: Optional[set] = None, cifar: Optional[str] = None, gpu: bool = False
) -> list[Step]:
    """The benchmark commands of a full (or ``quick``) run, restricted to the kinds in ``only``;
    ``gpu``: ViT-B/16 MAE steps on the first CUDA device in bf16, eager and compiled (flash
    attention through SDPA, fused AdamW), against HF ViTMAE in the same precision."""
    c = ["--cifar", cifar] if cifar else []
    if gpu:
        b, reps = ("8", "2") if quick else (str(GPU_BATCH), "10")
        common = [
            "--device",
            "cuda",
            "--precision",
            "bf16",
            "--preset",
            "vit_b16",
            "--batch",
            b,
            "--what",
            "mae",
            "--reps",
            reps,
            "--peak-size",
            "8192",
        ]
        steps = [
            Step("train vit_b16 cuda bf16", "train", "bench_train.py", common),
            Step(
                "train vit_b16 cuda bf16 compiled",
                "train",
                "bench_train.py",
                common + ["--compile"],
            ),
        ]
    elif quick:
        steps = [
            Step(
                "train tiny",
                "train",
                "bench_train.py",
                [
                    "--preset",
                    "tiny",
                    "--batch",
                    "8",
                    "--what",
                    "both",
                    "--reps",
                    "1",
                    "--peak-size",
                    "512",
                ],
            ),
            Step(
                "train vit_b16",
                "train",
                "bench_train.py",
                [
                    "--preset",
                    "vit_b16",
                    "--batch",
                    "2",
                    "--what",
                    "mae",
                    "--reps",
                    "1",
                    "--peak-size",
                    "512",
                ],
            ),
            Step(
                "data",
                "data",
                "bench_data.py",
                [
                    "--batch-cifar",
                    "16",
                    "--batch-folder",
                    "2",
                    "--batches",
                    "4",
                    "--reps",
                    "1",
                    "--fed-steps",
                    "1",
                    "--folder-images",
                    "24",
                    *c,
                ],
            ),
            Step(
                "memory",
                "memory",
                "bench_memory.py",
                ["--configs", "tiny@16,vit_b16@2", "--steps", "1"],
            ),
        ]
    else:
        steps = [
            Step(
                "train tiny",
                "train",
                "bench_train.py",
                ["--preset", "tiny", "--batch", "128", "--what", "both", "--reps", "5"],
            ),
            Step(
                "train vit_b16",
                "train",
                "bench_train.py",
                [
                    "--preset",
                    "vit_b16",
                    "--batch",
                    "16",
                    "--what",
                    "mae",
                    "--reps",
                    "3",
                    "--checkpointing",
                    "selective,full",
                ],
            ),
            Step(
                "train tiny compiled",
                "train",
                "bench_train.py",
                [
                    "--preset",
                    "tiny",
                    "--batch",
                    "128",
                    "--what",
                    "both",
                    "--reps",
                    "5",
                    "--compile",
                ],
            ),
            Step(
                "data",
                "data",
                "bench_data.py",
                [
                    "--workers",
                    "2",
                    "--preset-cifar",
                    "tiny",
                    "--batch-cifar",
                    "128",
                    "--preset-folder",
                    "vit_b16",
                    "--batch-folder",
                    "16",
                    *c,
                ],
            ),
            Step(
                "memory",
                "memory",
                "bench_memory.py",
                [
                    "--configs",
                    "tiny@128,vit_b16@16,vit_b16@64,vit_b16@64+selective,vit_b16@64+full",
                    "--limit-gib",
                    "8",
                ],
            ),
        ]
    return [s for s in steps if only is None or s.kind in only]


def child_env(extra: Optional[dict] = None) -> dict:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_steps(
    steps: list[Step],
    workdir: Path,
    echo: bool = True,
    timeout: Optional[float] = None,
    env: Optional[dict] = None,
) -> list[dict]:
    """Run each step as a subprocess in the repository root (``env``: extra environment
    variables), streaming its output when ``echo``; returns per step: name, kind, command,
    exit status, seconds, output and the JSON records it wrote."""
    out = []
    for i, st in enumerate(steps):
        jf = workdir / f"{i}-{st.kind}.jsonl"
        if echo:
            print(f"$ {st.shown()}", flush=True)
        t = time.time()
        p = subprocess.Popen(
            st.argv(str(jf)),
            cwd=REPO,
            env=child_env(env),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines = []
        try:
            for line in p.stdout:
                lines.append(line)
                if echo:
                    print("  " + line, end="", flush=True)
            rc = p.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            p.kill()
            p.wait()
            raise
        records = []
        if jf.exists():
            records = [json.loads(ln) for ln in jf.read_text().splitlines() if ln.strip()]
        out.append(
            {
                "name": st.name,
                "kind": st.kind,
                "command": st.shown(),
                "rc": rc,
                "seconds": time.time() - t,
                "output": "".join(lines),
                "records": records,
            }
        )
        if echo and rc != 0:
            print(f"  (exit status {rc})", flush=True)
    return out


# ------------------------------------------------------------------------ machine and versions
def _cpuinfo() -> dict:
    model, cores = None, set()
    phys = core = None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines() + [""]:
        k, _, v = (s.strip() for s in line.partition(":"))
        if k == "model name" and model is None:
            model = v
        elif k == "physical id":
            phys = v
        elif k == "core id":
            core = v
        elif not line.strip():
            if core is not None:
                cores.add((phys, core))
            phys = core = None
    flags = next(
        (ln.partition(":")[2].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    simd = [
        f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags
    ]
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "physical_cores": len(cores) or None,
        "simd": simd,
    }


def _meminfo_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_info() -> dict:
    info = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info.update(
        logical_cpus=os.cpu_count(),
        usable_cpus=usable,
        memory_gib=_meminfo_gib(),
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        loadavg_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _git(*args) -> Optional[str]:
    try:
        p = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    except Exception:  # noqa: BLE001 - best effort
        return None


def versions() -> dict:
    v = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "transformers", "numpy", "pillow"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = "not installed"
    v["mimlab"] = __version__
    v["git"] = _git("rev-parse", "--short", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    v["git_dirty"] = bool(status) if status is not None else None
    return v


# ------------------------------------------------------------------------ report
def target_rows(records: list[dict], targets: Optional[dict] = None) -> list[dict]:
    """One row per training record that has a speed target: the target ratio, the measured one,
    and the fraction of the measured fp32 matmul peak mimlab would have to sustain to meet it,
    ``needed = target * reference_img_s * gflops_per_image / matmul_peak_gflop_s`` (both models
    do the same work, counted on mimlab's step). ``needed`` near or above 1 means the target
    cannot be met by fp32 arithmetic on this machine however the step is scheduled."""
    targets = TARGETS if targets is None else targets
    rows = []
    for r in records:
        t = targets.get((r["what"], r["preset"]))
        if t is None or r.get("device", "cpu") != "cpu":  # the targets are CPU targets
            continue
        rows.append(
            {
                "what": r["what"],
                "preset": r["preset"],
                "batch": r["batch"],
                "compile": bool(r.get("compile")),
                "target": t,
                "ratio": r["ratio"],
                "met": r["ratio"] >= t,
                "fraction_of_peak": r["fraction_of_peak"],
                "needed_fraction_of_peak": t
                * r["reference_img_s"]
                * r["gflops_per_image"]
                / r["matmul_peak_gflop_s"],
            }
        )
    return rows


def _official_section(records: list[dict]) -> list[str]:
    """Report lines for the MAE records that name the official MAE code (bench_train.py
    ``--official-mae`` / ``MIMLAB_OFFICIAL_MAE``): mimlab, HF and the official code timed in one
    alternation, mimlab's ratio to each and to the faster peer; a record without the official
    code shows '-' and the reason. None for records of runs that predate the column."""
    rows = [r for r in records if "official_img_s" in r]
    if not rows:
        return []
    L = [
        "",
        "MAE against both peers: HF `ViTMAEForPreTraining` and the official "
        "facebookresearch/mae `models_mae.MaskedAutoencoderViT` (imported at run time from "
        "`--official-mae DIR` or `$MIMLAB_OFFICIAL_MAE`, never part of mimlab), same "
        "configuration, batch and mask ratio, in the same alternation. ratio = peer step time / "
        "mimlab step time.",
        "",
    ]
    L += _table(
        [
            "step",
            "preset",
            "batch",
            "mimlab img/s",
            "HF img/s",
            "official img/s",
            "vs HF",
            "vs official",
            "vs faster peer",
        ],
        [
            [
                r["what"] + (" (compiled)" if r.get("compile") else "") + _where(r),
                r["preset"],
                str(r["batch"]),
                _f(r["mimlab_img_s"]),
                _f(r["reference_img_s"]),
                _f(r["official_img_s"]),
                _f(r["ratio"], 2),
                _f(r.get("ratio_official"), 2),
                _f(r["ratio_peer"], 2),
            ]
            for r in rows
        ],
    )
    absent = sorted({r["official_absent"] for r in rows if r.get("official_absent")})
    if absent:
        L += ["", "; ".join(absent) + " ('-' above)."]
    return L


def _f(x, nd: int = 1, suffix: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:,.{nd}f}{suffix}"
    return str(x)


def _where(r: dict) -> str:
    """' [cuda, bf16]' for a record not measured on the CPU in fp32 (records of earlier runs
    have neither field: CPU, fp32)."""
    dev, prec = r.get("device", "cpu"), r.get("precision", "fp32")
    return "" if (dev, prec) == ("cpu", "fp32") else f" [{r.get('device_name') or dev}, {prec}]"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render(meta: dict, results: list[dict]) -> str:
    m, v = meta["machine"], meta["versions"]
    recs = {k: [r for s in results if s["kind"] == k for r in s["records"]] for k in KINDS}
    L = ["# mimlab performance", ""]
    L.append(f"Generated by `{meta['command']}` on {meta['date']} in {meta['seconds']:.0f} s.")
    if meta.get("quick"):
        L += [
            "",
            "**Quick smoke run** (small batches, one repetition): the numbers check that "
            "the benchmarks run; do not quote them.",
        ]
    load = m.get("loadavg_start")
    if load is not None and m.get("usable_cpus") and load > 0.5:
        L += [
            "",
            f"Note: the 1-minute load average was {load:.2f} at the start and "
            f"{_f(meta.get('loadavg_end'), 2)} at the end on {m['usable_cpus']} CPUs (it "
            "decays over minutes, so it also counts work that ended shortly before, and at "
            "the end it counts the benchmarks' own threads): where other work was running, "
            "rates are lower than on an idle machine.",
        ]
    L += ["", "## Machine and software", ""]
    cores = f"{m['logical_cpus']} logical CPUs"
    if m.get("physical_cores"):
        cores += f", {m['physical_cores']} physical cores"
    if m.get("usable_cpus") != m.get("logical_cpus"):
        cores += f", {m['usable_cpus']} usable by this process"
    dirty = " + uncommitted changes" if v.get("git_dirty") else ""
    L += _table(
        ["", ""],
        [
            ["CPU", f"{m['cpu_model']} ({cores})"],
            [
                "SIMD (of avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile)",
                " ".join(m.get("simd") or []) or "-",
            ],
            ["memory", _f(m.get("memory_gib"), 1, " GiB")],
            *([["GPU", ", ".join(m["gpus"])]] if m.get("gpus") else []),
            ["OS", f"{m['os']} ({m['arch']})"],
            ["OMP_NUM_THREADS", m.get("omp_num_threads") or "unset (torch uses all cores)"],
            ["python", v["python"]],
            ["torch / torchvision", f"{v['torch']} / {v['torchvision']}"],
            ["timm / transformers", f"{v['timm']} / {v['transformers']}"],
            ["numpy / pillow", f"{v['numpy']} / {v['pillow']}"],
            ["mimlab", f"{v['mimlab']}, git {v['git']}{dirty}"],
        ],
    )
    L += [
        "",
        "## Commands",
        "",
        "Run one after the other from the repository root "
        "(`mimlab bench` writes the JSON lines to a temporary file):",
        "",
        "```",
    ]
    for s in results:
        L.append(s["command"])
    L += ["```", ""]
    L += _table(
        ["command", "seconds", "exit status"],
        [[s["name"], _f(s["seconds"], 0), str(s["rc"])] for s in results],
    )

    if recs["train"]:
        L += [
            "",
            "## Training step (`bench_train.py`)",
            "",
            "Full steps (forward, backward, AdamW) on random tensors, on the CPU in fp32 "
            "unless marked [device, precision], mimlab and the reference alternated, median "
            "over repetitions. ratio = reference step time / mimlab step time (> 1: mimlab "
            "faster). FLOPs of the mimlab step counted with `torch.utils.flop_counter`; peak "
            "= best matmul in the step's precision on its device, measured in the same run.",
            "",
        ]
        rows = [
            [
                r["what"]
                + (
                    f" (compiled, {r['compile_seconds']:.0f} s to compile)"
                    if r.get("compile")
                    else ""
                )
                + _where(r),
                r["preset"],
                str(r["batch"]),
                str(r.get("reps", "-")),
                str(r["threads"]),
                _f(r["mimlab_img_s"]),
                r["reference_name"],
                _f(r["reference_img_s"]),
                _f(r["ratio"], 2),
                _f(r["gflops_per_image"], 2),
                _f(r["mimlab_gflop_s"], 0),
                f"{100 * r['fraction_of_peak']:.0f} % of {r['matmul_peak_gflop_s']:.0f}",
            ]
            for r in recs["train"]
        ]
        L += _table(
            [
                "step",
                "preset",
                "batch",
                "reps",
                "threads",
                "mimlab img/s",
                "reference",
                "reference img/s",
                "ratio",
                "GFLOP/img",
                "mimlab GFLOP/s",
                "of matmul peak GFLOP/s",
            ],
            rows,
        )
        L += _official_section(recs["train"])
        bf = [
            r
            for r in recs["train"]
            if r.get("matmul_peak_bf16_gflop_s") and r.get("precision", "fp32") == "fp32"
        ]  # its peak column is then fp32
        if bf:
            r = bf[0]
            L += [
                "",
                f"Lower precision: the bf16 matmul peak measured in the same run is "
                f"{r['matmul_peak_bf16_gflop_s']:.0f} GFLOP/s against "
                f"{r['matmul_peak_gflop_s']:.0f} GFLOP/s in fp32 "
                f"({r['matmul_peak_bf16_gflop_s'] / r['matmul_peak_gflop_s']:.2f}x), so "
                + (
                    "bf16 autocast could speed up the steps on this machine."
                    if r["matmul_peak_bf16_gflop_s"] > 1.2 * r["matmul_peak_gflop_s"]
                    else "bf16 would not speed up training on this machine; the steps stay fp32."
                ),
            ]
        for r in recs["train"]:
            if r.get("device", "cpu") == "cpu" or r["what"] != "mae" or r["preset"] != "vit_b16":
                continue
            L += [
                "",
                f"GPU ({r.get('device_name') or r['device']}, {r['precision']}"
                f"{', compiled' if r.get('compile') else ''}, batch {r['batch']}): ViT-B/16 "
                f"MAE pretraining at {r['mimlab_img_s']:,.0f} images/s per GPU "
                f"({r['mimlab_img_s'] / GPU_REFERENCE_IMG_S:.2f}x the ~{GPU_REFERENCE_IMG_S:,} "
                f"images/s per A100 of published fast-MAE pipelines; HF ViTMAE "
                f"{r['reference_img_s']:,.0f} images/s in the same run); model-FLOPs "
                f"utilisation {100 * r['fraction_of_peak']:.0f} % of the "
                f"{r['matmul_peak_gflop_s'] / 1000:,.0f} TFLOP/s {r['precision']} matmul peak "
                "measured on that GPU (not the datasheet figure).",
            ]
        ck = [r for r in recs["train"] if r.get("checkpointing_img_s")]
        if ck:
            L += [
                "",
                "Activation checkpointing (`model.grad_checkpointing`): mimlab's MAE step "
                "timed with each mode in the same alternation as the row above; relative = "
                "img/s with the mode / img/s without checkpointing (memory: see Peak memory "
                "below).",
                "",
            ]
            L += _table(
                ["step", "preset", "batch", "model.grad_checkpointing", "img/s", "relative"],
                [
                    [r["what"], r["preset"], str(r["batch"]), "off", _f(r["mimlab_img_s"]), "1.00"]
                    for r in ck
                ]
                + [
                    [
                        r["what"],
                        r["preset"],
                        str(r["batch"]),
                        mode,
                        _f(v),
                        _f(v / r["mimlab_img_s"], 2),
                    ]
                    for r in ck
                    for mode, v in r["checkpointing_img_s"].items()
                ],
            )
        tr = target_rows(recs["train"])
        if tr:
            L += [
                "",
                "### Against the targets",
                "",
                "needed = fraction of the matmul peak that mimlab's step would have to sustain "
                "to reach the target ratio (target x reference img/s x GFLOP/img / peak). A "
                "training step also runs softmax, LayerNorm, GELU, AdamW and memory-bound "
                "copies far below the matmul peak, so a step as a whole stays below it; a "
                "target whose 'needed' is close to 100 % is out of reach of any fp32 "
                "implementation on this machine.",
                "",
            ]
            L += _table(
                [
                    "step",
                    "preset",
                    "batch",
                    "torch.compile",
                    "target",
                    "measured",
                    "met",
                    "mimlab % of peak",
                    "needed % of peak",
                ],
                [
                    [
                        r["what"],
                        r["preset"],
                        str(r["batch"]),
                        "yes" if r["compile"] else "no",
                        f"{r['target']:.2f}x",
                        f"{r['ratio']:.2f}x",
                        "yes" if r["met"] else "**no**",
                        f"{100 * r['fraction_of_peak']:.0f} %",
                        f"{100 * r['needed_fraction_of_peak']:.0f} %",
                    ]
                    for r in tr
                ],
            )

    if recs["data"]:
        L += [
            "",
            "## Data pipeline (`bench_data.py`)",
            "",
            "data = images/s of mimlab's training DataLoader (decode + RandomResizedCrop + "
            "flip + normalise + the method's patch mask per sample) with the given workers "
            "and training idle; train = images/s of MAE training steps of the matching "
            "preset measured in the same run. data/train < 1: training would wait on data "
            "even with cores reserved for the workers. cores for data = cores the pipeline "
            "needs to keep up with training (taken from training where they share the "
            "machine). fed = training steps fed by that DataLoader as the engine runs them, "
            "workers and training sharing the machine.",
            "",
        ]
        rows = [
            [
                r["case"],
                str(r["img_size"]),
                str(r["workers"]),
                str(r["batch"]),
                _f(r["data_img_s"]),
                f"{r['train_preset']}@{r['train_batch']}",
                _f(r["train_img_s"]),
                _f(r["ratio"], 2),
                "**yes**" if r["training_waits"] else "no",
                _f(r["cores_for_data"], 2),
                _f(r.get("fed_img_s")),
                _f(r.get("fed_over_train"), 2),
            ]
            for r in recs["data"]
        ]
        L += _table(
            [
                "dataset",
                "px",
                "workers",
                "batch",
                "data img/s",
                "train",
                "train img/s",
                "data / train",
                "training waits?",
                "cores for data",
                "fed img/s",
                "fed / train",
            ],
            rows,
        )
        seen = set()
        L.append("")
        for r in recs["data"]:
            if r["case"] not in seen:
                seen.add(r["case"])
                L.append(
                    f"- {r['case']}: {r['dataset']}: {r['source']}; {r['files']} files, "
                    f"typically {r['typical_px']} px, {r['mean_file_kib']} KiB on average; "
                    f"mask {r['mask']} ({r['mask_us_per_image']:.0f} µs/image); worker "
                    f"start-up {r['data_startup_s']:.2f} s"
                )

    if recs["memory"]:
        mem = recs["memory"]
        limit = next((r["limit_gib"] for r in mem if r.get("limit_gib")), 8.0)
        L += [
            "",
            "## Peak memory (`bench_memory.py`)",
            "",
            "Peak resident set size (VmHWM) of one process running MAE training steps "
            '(fp32, AdamW), each configuration in a fresh process; "after imports" is the '
            "python + torch runtime included in the peak. DataLoader workers are separate "
            "processes (not included).",
            "",
        ]
        rows = []
        for r in mem:
            mode = checkpointing_mode(r.get("grad_checkpointing", "off"))
            name = r["preset"] + ("" if mode == "off" else f" + {mode} checkpointing")
            if r.get("error"):
                rows.append(
                    [name, str(r["batch"]), f"failed: {r['error']}", "-", "-", "-", "-", "-"]
                )
                continue
            per = r.get("peak_gib_per_step") or []
            secs = r.get("step_s") or []
            rows.append(
                [
                    name,
                    str(r["batch"]),
                    _f(r["peak_gib"], 2),
                    _f(per[0], 2) if per else "-",
                    _f(r["rss_after_import_gib"], 2),
                    _f(r["state_gib"], 2) + f" ({r['params'] / 1e6:.1f} M params)",
                    "yes" if r["fits_limit"] else "**no**",
                    _f(secs[-1] if secs else None),
                ]
            )
        L += _table(
            [
                "preset",
                "batch",
                "peak RSS GiB",
                "after step 1 GiB",
                "after imports GiB",
                "weights+grads+AdamW GiB",
                f"fits in {limit:g} GiB",
                "last step s",
            ],
            rows,
        )
        b64 = [r for r in mem if r["preset"] == "vit_b16" and r["batch"] == 64]
        for r in b64:
            mode = checkpointing_mode(r.get("grad_checkpointing", "off"))
            how = (
                ""
                if mode == "off"
                else f" with {mode} activation checkpointing (`model.grad_checkpointing={mode}`)"
            )
            if r.get("error"):
                L += ["", f"vit_b16 at batch 64{how} did not complete ({r['error']})."]
            else:
                L += [
                    "",
                    f"vit_b16 at batch 64{how} "
                    f"{'fits' if r['fits_limit'] else 'does NOT fit'} "
                    f"in {limit:g} GiB: peak {r['peak_gib']:.2f} GiB.",
                ]

    L += ["", "## Console output", "", "<details><summary>show</summary>", "", "```"]
    for s in results:
        L.append(f"$ {s['command']}")
        L.append(s["output"].rstrip())
    L += ["```", "", "</details>", ""]
    return "\n".join(L)


def run_bench(
    out: str = DEFAULT_OUT,
    quick: bool = False,
    only: Optional[set] = None,
    cifar: Optional[str] = None,
    dry_run: bool = False,
    echo: bool = True,
    steps: Optional[list[Step]] = None,
    gpu: bool = False,
) -> int:
    """Run the plan (or ``steps``), write ``out`` (markdown) and ``out`` with ``.json``.
    Returns 0, or 1 when a benchmark exited with an error (the report is still written)."""
    steps = plan(quick, only, cifar, gpu) if steps is None else steps
    if dry_run:
        for s in steps:
            print(s.shown())
        return 0
    t0 = time.time()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "mimlab bench"
        + (" --gpu" if gpu else "")
        + (" --quick" if quick else "")
        + (f" --only {','.join(sorted(only))}" if only else ""),
        "quick": quick,
        "machine": machine_info(),
        "versions": versions(),
    }
    with tempfile.TemporaryDirectory(prefix="mimlab-bench-") as tmp:
        results = run_steps(steps, Path(tmp), echo=echo)
    meta["seconds"] = time.time() - t0
    meta["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    outp = Path(out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.write_text(render(meta, results))
    outp.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str)
    )
    failed = [s["name"] for s in results if s["rc"] != 0]
    if echo:
        print(f"report: {outp} (raw: {outp.with_suffix('.json')})")
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------------------ entry point
def main_from_args(args) -> int:
    """``mimlab bench`` (its options are declared in ``mimlab/cli.py``): ``args`` has quick,
    out (None = the default report of the plan), only, cifar, gpu and dry_run."""
    only = None
    if args.only:
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        bad = only - set(KINDS)
        if bad:
            print(
                f"mimlab bench: unknown benchmark(s) {', '.join(sorted(bad))}; choose from "
                f"{', '.join(KINDS)}",
                file=sys.stderr,
            )
            return 2
    gpu = bool(getattr(args, "gpu", False))
    if gpu and not args.dry_run and not torch.cuda.is_available():
        print("mimlab bench --gpu: no CUDA device is available to this torch", file=sys.stderr)
        return 1
    out = args.out or (GPU_OUT if gpu else DEFAULT_OUT)
    return run_bench(out, args.quick, only, args.cifar, args.dry_run, gpu=gpu)
