"""Protocol v2's sub-runs: pretraining runs, fine-tunes and probes, each one small result file.

A finished sub-run is skipped when its file exists (``<results>/v2/<stage>/<kind>/<name>.json``),
so a stage resumes at sub-run granularity on a fresh machine; a checkpoint lost with its
machine is retrained when a pending sub-run needs it (pretraining is deterministic).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ... import tasks
from ...analysis.cka_interval import occlusion_cka
from ...analysis.recon import analyze_psnr
from ...analysis.teacher_targets import teacher_target_diversity
from ...core.config import FinetuneConfig, PretrainConfig, ProbeConfig, resolve
from .arms import ARMS, CKA_ARMS, FT10, PSNR_ARMS, Arm, ema_overrides, stage_of
from .files import read_result, write_result
from .wall import now, timed

HOLDOUT = 0.2  # the class-balanced part of the pool held out for choices (never test)
#: small-data arms: the stopping points tried, as fractions of the step budget
STOP_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def ft_overrides(p: dict, epochs: int, pretrained: Optional[str], holdout: bool) -> list[str]:
    """The fine-tuning overrides of protocol v2's recipe for a schedule of ``epochs``."""
    r = p["ft_recipe"]
    ld = r["layer_decay"]["pretrained" if pretrained else "random"]
    ov = [
        f"optim.epochs={epochs}",
        f"optim.batch_size={p['pretrain']['batch']}",
        f"optim.base_lr={r['base_lr_per_256']:g}",
        f"optim.warmup_epochs={max(1.0, 0.05 * epochs):g}",
        "optim.weight_decay=0.05",
        f"optim.layer_decay={ld}",
        f"model.drop_path={r['drop_path']}",
        f"finetune.label_smoothing={r['label_smoothing']}",
        f"finetune.mixup={r['mixup']}",
        f"finetune.cutmix={r['cutmix']}",
        "run.save_every_steps=0",  # the engine still writes last.pt at every epoch's end
        "run.resume=auto",  # an interrupted fine-tune continues from its last epoch
        "run.log_every=50",
    ]
    if holdout:
        ov.append(f"data.holdout={HOLDOUT}")
    ov += [f"finetune.pretrained={pretrained}"] if pretrained else [f"model.preset={p['model']}"]
    return ov


class EvidenceError(Exception):
    """Bad stage, missing protocol or missing prerequisite (printed as one line)."""


def small_overrides(
    arm: Arm, steps: int, batch: int, warmup_epochs: float, epochs: int, seed: int = 0
) -> list:
    """N images (drawn with the arm's subset strategy and subset seed ``seed``: which images is
    part of a run's variance) repeated to ``steps`` optimizer steps (one 'epoch' of the
    repeated set)."""
    if not arm.small:
        return []
    return [
        f"data.limit={arm.small}",
        f"data.subset={arm.subset}",
        f"data.subset_seed={seed}",
        f"data.repeat={math.ceil(steps * batch / arm.small)}",
        "optim.epochs=1",
        f"optim.warmup_epochs={warmup_epochs / epochs:g}",
    ]


@dataclass
class Runner:
    protocol: dict
    data: str
    runs: Path  # run directories (checkpoints; not committed)
    results: Path  # small result files (committed): <results>/v2/...
    workers: int = 1
    stimuli: Optional[str] = None  # cue-conflict folder: every fine-tune records its shape bias
    # seconds spent in sub-runs nested in each running step (innermost last): a step's own
    # wall time leaves them out, since their own result files count them
    _nested: list = field(default_factory=list, repr=False)

    def _file(self, name: str) -> Path:
        return self.results / "v2" / f"{name}.json"

    def done(self, name: str) -> Optional[dict]:
        return read_result(self._file(name))

    def step(self, name: str, fn: Callable[[], dict], force: bool = False) -> dict:
        """Run ``fn`` unless its result file exists; write it (atomically) when done."""
        res = None if force else self.done(name)
        if res is not None:
            return res
        print(f"[evidence] {name}: running ...", flush=True)
        # [seconds of finished nested sub-runs, start of the running one or None]
        frame: list = [0.0, None]

        def excluded() -> float:
            return frame[0] + (now() - frame[1] if frame[1] is not None else 0.0)

        if self._nested:  # the enclosing step leaves out all of this one's time
            self._nested[-1][1] = now()
        self._nested.append(frame)
        try:
            out, took, total = timed(
                self.runs / "v2" / ".wall" / f"{name}.txt", fn, excluded=excluded
            )
        finally:
            self._nested.pop()
            if self._nested:
                parent = self._nested[-1]
                parent[0], parent[1] = parent[0] + now() - parent[1], None
        res = {
            **out,
            "wall_seconds": round(total, 1),  # every attempt on this machine
            "wall_seconds_last_attempt": round(took, 1),
            "wall_exclusive": True,  # nested sub-runs left out (counted in their own files)
            "protocol": 2,
        }
        write_result(self._file(name), res)
        print(f"[evidence] {name}: done in {took:.0f} s ({total:.0f} s in all)", flush=True)
        return res

    def _common(self, sub: str, name: str, seed: int) -> list[str]:
        p = self.protocol
        return [
            f"data.path={self.data}",
            f"run.out_dir={self.runs / 'v2' / sub}",
            f"run.name={name}",
            "run.overwrite=true",  # the suite owns its folders: a failed / stale sub-run is redone
            f"run.seed={seed}",
            "run.progress=false",
            f"data.num_workers={self.workers}",
            f"data.limit={p['pool']['images']}",
            f"data.subset_seed={p['pool']['subset_seed']}",
        ]

    # -- pretraining -------------------------------------------------------------------------
    def pretrain_overrides(self, stage: str, arm_name: str, seed: int) -> list[str]:
        p, arm = self.protocol, ARMS[arm_name]
        pre = p["pretrain"]
        return self._common(f"{stage}/pretrain", f"{arm_name}-s{seed}", seed) + [
            f"model.preset={p['model']}",
            f"method.name={arm.method}",
            f"optim.epochs={pre['epochs']}",
            f"optim.batch_size={pre['batch']}",
            f"optim.base_lr={1.5e-3 * arm.lr_scale:g}",
            "optim.warmup_epochs=1",
            *small_overrides(arm, pre["steps"], pre["batch"], 1.0, pre["epochs"], seed),
            "run.resume=auto",
            "run.log_every=20",
            "run.save_every_steps=100",
            *arm.overrides,
            *(ema_overrides(p) if arm.ema else ()),
        ]

    def checkpoint(self, stage: str, arm_name: str, seed: int) -> str:
        """The pretraining run's checkpoint, (re)made when missing."""
        name = f"{stage}/pretrain/{arm_name}-s{seed}"

        def fn() -> dict:
            if ARMS[arm_name].method == "supervised":
                return self._supervised(stage, arm_name, seed)
            ov = self.pretrain_overrides(stage, arm_name, seed)
            return tasks.pretrain(resolve(PretrainConfig, overrides=ov))

        res = self.step(name, fn)
        if not Path(res.get("checkpoint", "")).is_file():  # lost with its machine: remake it
            res = self._remade(name, res, self.step(name, fn, force=True))
        return res["checkpoint"]

    def _remade(self, name: str, old: dict, new: dict) -> dict:
        """Record in ``new`` (a remade pretraining run) whether it ends where the recorded run
        ended, the evidence that results made from the lost checkpoint still stand, and keep
        the lost attempt's wall time in the stage's sum."""
        key = "final_loss" if "final_loss" in old else "top1"
        same = old.get(key) == new.get(key)
        prior = [dict(x) for x in old.get("remade", [])]
        if len(prior) == 1 and "wall_seconds" not in prior[0]:  # recorded before remakes had it
            prior[0]["wall_seconds"] = old.get("wall_seconds_last_attempt", 0.0)
        new = {
            **new,
            "wall_seconds": round(new["wall_seconds"] + float(old.get("wall_seconds", 0.0)), 1),
            "remade": [
                *prior,
                {
                    "metric": key,
                    "recorded": old.get(key),
                    "remade": new.get(key),
                    "same": same,
                    "wall_seconds": new["wall_seconds"],
                },
            ],
        }
        write_result(self._file(name), new)
        if not same:
            print(
                f"[evidence] {name}: WARNING the remade checkpoint ends at {key} "
                f"{new.get(key)}, the recorded run at {old.get(key)}",
                flush=True,
            )
        return new

    def _supervised(self, stage: str, arm_name: str, seed: int) -> dict:
        """A supervised "pretraining" run: random init fine-tuned with the protocol's
        random-init recipe on the arm's labelled images for the pretraining step budget."""
        p, arm = self.protocol, ARMS[arm_name]
        pre = p["pretrain"]
        ov = self._common(f"{stage}/pretrain", f"{arm_name}-s{seed}", seed)
        ov += ft_overrides(p, 1, None, holdout=False)
        ov += small_overrides(arm, pre["steps"], pre["batch"], 1.0, pre["epochs"], seed)
        ov += list(arm.overrides)
        res = tasks.finetune(tasks.resolve_run_config(FinetuneConfig, overrides=ov))
        res.pop("correct", None)
        return {**res, "checkpoint": str(Path(res["run_dir"]) / "checkpoints" / "last.pt")}

    # -- evaluation --------------------------------------------------------------------------
    def ft_epochs(self) -> int:
        b = self.protocol["ft_epochs"]["value"]
        if not b:
            raise EvidenceError(
                "protocol v2 has no ft_epochs yet: run pilot P1 (--stage ftbudget) and commit "
                "the budget its rule chooses"
            )
        return int(b)

    def ft_run(
        self,
        name: str,
        sub: str,
        ckpt: Optional[Callable[[], str]],
        seed: int,
        epochs: int,
        eval_at: list,
        holdout: bool = False,
        label_fraction: float = 1.0,
    ) -> dict:
        """One fine-tune (``ckpt``: lazy checkpoint, None = random init) with the protocol's
        recipe for ``epochs``, evaluated after the epochs ``eval_at`` and at the end: on the
        held-out part of the pool with ``holdout``, else on test."""

        def fn() -> dict:
            ck = ckpt() if ckpt else None
            ov = self._common(sub, Path(name).name, seed) + ft_overrides(
                self.protocol, epochs, ck, holdout
            )
            ov.append(f"finetune.eval_at=[{','.join(str(e) for e in eval_at if e < epochs)}]")
            if label_fraction != 1.0:
                ov.append(f"finetune.label_fraction={label_fraction:g}")
            if self.stimuli and not holdout:  # claim (k): recorded right after fine-tuning
                ov.append(f"finetune.shape_bias={self.stimuli}")
            res = tasks.finetune(tasks.resolve_run_config(FinetuneConfig, overrides=ov))
            if holdout:
                res.pop("correct", None)  # held-out correctness serves no comparison
            elif ckpt is None and label_fraction == 1.0:  # claim (e)'s supervised model
                res["cka"] = self._cka(checkpoint=str(Path(res["run_dir"]) / "checkpoints/last.pt"))
            return res

        return self.step(name, fn)

    def finetune(
        self,
        stage: str,
        arm: str,
        seed: int,
        label_fraction: float = 1.0,
        full_budget: bool = False,
    ) -> dict:
        """One fine-tune of ``arm``'s run ``seed`` (random init: FT seed ``seed``), scored on
        test along its schedule. Small-data arms start from the early-stopped checkpoint
        (:meth:`early_stop`), or with ``full_budget`` from the end of the step budget (tag
        ``-full``, reported beside it)."""
        tag = f"{arm}-s{seed}" + ("" if label_fraction == 1.0 else f"-lf{label_fraction:g}")
        stage = sub = stage_of(arm)  # an arm's runs live in its own stage, whoever asks
        epochs = self.ft_epochs()
        at = list(self.protocol["ft_eval_at_epochs"])
        if (
            label_fraction != 1.0
        ):  # the same optimizer steps (and evaluation points) on fewer labels
            epochs = round(epochs / label_fraction)
            at = [round(e / label_fraction) for e in at]
        ck = None if arm == "random" else (lambda: self.checkpoint(stage, arm, seed))
        if full_budget:
            tag += "-full"
        elif arm in ARMS and ARMS[arm].small and ARMS[arm].method != "supervised":
            # the protocol's unit: the early-stopped run
            ck = lambda: self.early_stop(stage, arm, seed)["checkpoint"]  # noqa: E731
        return self.ft_run(
            f"{sub}/ft/{tag}",
            f"{sub}/ft",
            ck,
            seed,
            epochs,
            at,
            label_fraction=label_fraction,
        )

    def probe(self, stage: str, arm: str, seed: int, kind: str) -> dict:
        """``lp_cls`` (linear probe on the class token, MAE's protocol) or ``knn``."""
        stage = sub = stage_of(arm)
        name = f"{sub}/{kind}/{arm}-s{seed}"

        def fn() -> dict:
            if arm == "random":
                ck = None
            elif ARMS[arm].small and ARMS[arm].method != "supervised":
                ck = self.early_stop(stage, arm, seed)["checkpoint"]  # the unit's init
            else:
                ck = self.checkpoint(stage, arm, seed)
            ov = self._common(f"{sub}/{kind}", f"{arm}-s{seed}", seed) + (
                ["probe.epochs=30", "probe.feature=cls", "probe.lr_extend=3"]
                if kind == "lp_cls"
                else ["probe.feature=avg"]
            )
            ov += [f"probe.pretrained={ck}"] if ck else [f"model.preset={self.protocol['model']}"]
            f = tasks.linprobe if kind == "lp_cls" else tasks.knn
            return f(tasks.resolve_run_config(ProbeConfig, overrides=ov))

        return self.step(name, fn)

    def _held_out_knn(self, sub: str, name: str, ckpt: str, seed: int) -> float:
        """k-NN top-1 of ``ckpt``'s features on the held-out 20 % of the pool (choices, never
        test)."""
        ov = self._common(sub, name, seed)
        ov += [f"probe.pretrained={ckpt}", f"data.holdout={HOLDOUT}", "probe.feature=avg"]
        return float(tasks.knn(tasks.resolve_run_config(ProbeConfig, overrides=ov))["top1"])

    def _cka(self, **model) -> dict:
        c = self.protocol["cka"]
        return occlusion_cka(
            self.data,
            ratio=c["ratio"],
            images=c["images"],
            seed=c["image_seed"],
            resamples=c["bootstrap_resamples"],
            workers=self.workers,
            **model,
        )

    def cka(self, arm: str, seed: int) -> dict:
        """Claim (e): the last-block CKA(masked, full) of the arm's pretrained encoder (random
        init: random weights of seed ``seed``), with its bootstrap interval over the images."""
        sub = stage_of(arm)

        def fn() -> dict:
            if arm == "random":
                return self._cka(random_preset=self.protocol["model"], random_seed=seed)
            return self._cka(checkpoint=self.checkpoint(sub, arm, seed))

        return self.step(f"{sub}/cka/{arm}-s{seed}", fn)

    def psnr(self, arm: str, seed: int) -> dict:
        """Claim (b): reconstruction PSNR of the pretraining run (the same seeded test images
        and masks for every model); ``psnr`` is the protocol's reading."""
        sub, c = stage_of(arm), self.protocol["psnr"]

        def fn() -> dict:
            r = analyze_psnr(
                self.checkpoint(sub, arm, seed),
                self.data,
                images=c["images"],
                seed=c["seed"],
                out=str(self.runs / "v2" / sub / "psnr" / f"{arm}-s{seed}.json"),
                workers=self.workers,
                progress=False,
            )
            keep = ("psnr_visible_stats", "psnr_true_stats", "images", "mask_ratio", "split")
            return {"psnr": r[c["reading"]], "reading": c["reading"], **{k: r[k] for k in keep}}

        return self.step(f"{sub}/psnr/{arm}-s{seed}", fn)

    def teacher_targets(self) -> dict:
        """Spatial diversity of MaskDistill's targets (neighbour / far-patch cosine) with the
        protocol's teacher, and with v1's (``effnet_lite0`` after its activation, 64 px)."""
        t = self.protocol["settings"]["maskdistill_teacher"]
        grid = self.protocol.get("grid", 8)
        run = lambda spec, size: teacher_target_diversity(spec, self.data, size, grid)  # noqa: E731
        return {"v2": run(t["spec"], t["teacher_size"]), "v1": run("effnet_lite0", 64)}

    def lr_check(self, stage: str, arm: str) -> dict:
        """The protocol's check of a pretraining lr: run 0's recipe at x0.5 and x2 (one run
        each) against run 0, scored by k-NN on the held-out 20 % (reported, changes nothing)."""

        def fn() -> dict:
            scores = {}
            for f in (0.5, 1.0, 2.0):
                if f == 1.0:
                    ck = self.checkpoint(stage, arm, 0)
                else:
                    ov = self.pretrain_overrides(stage, arm, 0) + [
                        f"run.out_dir={self.runs / 'v2' / stage / 'lrcheck'}",
                        f"run.name={arm}-s0-lr{f:g}",
                        f"optim.base_lr={1.5e-3 * ARMS[arm].lr_scale * f:g}",
                    ]
                    ck = tasks.pretrain(resolve(PretrainConfig, overrides=ov))["checkpoint"]
                scores[f"{f:g}"] = self._held_out_knn(
                    f"{stage}/lrcheck", f"{arm}-knn-lr{f:g}", ck, 0
                )
            best = max(scores, key=lambda k: scores[k])
            return {"held_out_knn": scores, "best_factor": best, "protocol_factor": "1"}

        return self.step(f"{stage}/lrcheck/{arm}", fn)

    def early_stop(self, stage: str, arm: str, seed: int) -> dict:
        """Small-data arms (the paper's early stop): the pretraining run is stopped at
        :data:`STOP_FRACTIONS` of the step budget (one schedule; exact resume makes the chunks
        equal a straight run), each point scored by k-NN on the held-out 20 % of the pool; the
        best point's checkpoint (the earliest on a tie)."""
        name = f"{stage}/earlystop/{arm}-s{seed}"

        def fn() -> dict:
            steps = self.protocol["pretrain"]["steps"]
            ov = self.pretrain_overrides(stage, arm, seed)
            scores: dict = {}
            ckpts: dict = {}
            for frac in STOP_FRACTIONS:
                k = max(1, round(frac * steps))
                stop = [f"run.stop_at_step={k}"] if k < steps else []
                res = tasks.pretrain(resolve(PretrainConfig, overrides=ov + stop))
                src = Path(res["checkpoint"])
                dst = src.with_name(f"step{k}.pt")
                shutil.copyfile(src, dst)
                scores[k] = self._held_out_knn(
                    f"{stage}/earlystop", f"{arm}-s{seed}-step{k}", str(dst), seed
                )
                ckpts[k] = str(dst)
            best = max(scores, key=lambda k: (scores[k], -k))
            return {
                "held_out_knn": scores,
                "best_step": best,
                "budget_steps": steps,
                "checkpoint": ckpts[best],
            }

        res = self.step(name, fn)
        if not Path(res["checkpoint"]).is_file():  # lost with its machine
            res = self.step(name, fn, force=True)
        return res

    def units(self, arm: str) -> list[int]:
        if arm == "random":
            return list(range(self.protocol["random_init_ft_seeds"]))
        return list(range(self.protocol["pretrain_runs"][arm]))

    def run_stage(self, stage: str, arms: tuple) -> None:
        """Every unit of random init and of ``arms``: fine-tune, then the frozen-feature probes."""
        for arm in ("random", *arms):
            small = arm in ARMS and ARMS[arm].small
            for seed in self.units(arm):
                self.finetune(stage, arm, seed)
                if small and ARMS[arm].method != "supervised":
                    self.finetune(stage, arm, seed, full_budget=True)
                for kind in ("lp_cls", "knn"):
                    self.probe(stage, arm, seed, kind)
                if arm in CKA_ARMS or arm == "random":
                    self.cka(arm, seed)
                if arm in PSNR_ARMS:
                    self.psnr(arm, seed)
        for arm in FT10.get(stage, ()):  # 10 %-label fine-tunes (same optimizer steps)
            for seed in self.units(arm):
                self.finetune(stage, arm, seed, label_fraction=self.protocol["label_fraction_ft"])
        if "maskdistill" in arms:  # beside claim (g): v2's teacher targets against v1's
            self.step(f"{stage}/teacher_targets", self.teacher_targets)
        for arm in arms:  # after the verdicts' runs: is each method's pretraining lr sensible?
            a = ARMS[arm]
            if not a.small and a.method not in ("mae", "supervised"):
                self.lr_check(stage, arm)
