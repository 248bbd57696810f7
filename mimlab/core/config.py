"""Typed configuration: dataclasses that round-trip to YAML.

Every command (``pretrain``, ``finetune``, ``linprobe``, ``knn``, ...) has one top-level
dataclass made of the sections below. A config is resolved in this order::

    dataclass defaults  <-  --config file.yaml  <-  key=value overrides  <-  model preset

where the model preset (``model.preset=vit_b16``) fills every model field the user did not
set explicitly. Unknown keys fail with a did-you-mean, wrong types and impossible values fail
with one clear line (:class:`ConfigError`) before any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError  # noqa: F401  (re-exported: the config layer's error)
from .paper_settings import PAPER_OPTIM, paper_optim  # noqa: F401  (re-exported: suites scale lr)
from .registry import METHOD_PRESETS, PRESETS, check_method, method_aliases


def doc(text: str, **kw) -> Any:
    """Field metadata helper: ``x: int = doc("what x is", default=3)``."""
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata={"doc": text})
    return field(default=kw.get("default"), metadata={"doc": text})


# --------------------------------------------------------------------------------------
# Model presets. tiny is the CIFAR-sized model (patch 4, 32 px); the others follow ViT.
# --------------------------------------------------------------------------------------
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # for unit tests: a few thousand parameters
    "micro": dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    ),
    # reduced CIFAR ViT for the CPU evidence suite (`mimlab reproduce --suite evidence`)
    "mini": dict(
        img_size=32,
        patch_size=4,
        embed_dim=128,
        depth=6,
        num_heads=4,
        decoder_embed_dim=96,
        decoder_depth=1,
        decoder_num_heads=4,
    ),
    # CIFAR-sized ViT-Tiny: 64 tokens of 4x4 px
    "tiny": dict(
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=12,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # CIFAR-sized ViT-Small
    "small": dict(
        img_size=32,
        patch_size=4,
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
    ),
    "vit_t16": dict(
        img_size=224,
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    "vit_s16": dict(
        img_size=224,
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    "vit_b16": dict(
        img_size=224,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    "vit_l16": dict(
        img_size=224,
        patch_size=16,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
    "vit_h14": dict(
        img_size=224,
        patch_size=14,
        embed_dim=1280,
        depth=32,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ),
}


@dataclass
class ModelConfig:
    preset: Optional[str] = doc(
        "model preset: "
        + ", ".join(MODEL_PRESETS)
        + "; fills every model field not set explicitly",
        default="tiny",
    )
    img_size: int = doc("input resolution in pixels (square)", default=32)
    patch_size: int = doc("patch size in pixels", default=4)
    in_chans: int = doc("number of input channels (3 for RGB, 1 for grayscale)", default=3)
    embed_dim: int = doc("encoder width", default=192)
    depth: int = doc("number of encoder blocks", default=12)
    num_heads: int = doc("attention heads per encoder block", default=3)
    mlp_ratio: float = doc("MLP hidden width / embed_dim", default=4.0)
    drop_path: float = doc("stochastic depth rate (fine-tuning)", default=0.0)
    decoder_embed_dim: int = doc("MAE decoder width", default=128)
    decoder_depth: int = doc("MAE decoder blocks", default=2)
    decoder_num_heads: int = doc("MAE decoder attention heads", default=4)
    grad_checkpointing: str = doc(
        "activation checkpointing of the transformer blocks: off | selective | full. full "
        "keeps only each block's input and recomputes the block in the backward pass; "
        "selective keeps the matmul and attention outputs and recomputes only LayerNorm, GELU "
        "and additions (true = full, false = off). Figures measured for ViT-B/16 MAE at "
        "batch 64 on a 2-core CPU are in docs/performance.md",
        default="off",
    )


@dataclass
class DataConfig:
    path: Optional[str] = doc(
        "dataset root: an ImageFolder (class sub-folders), a plain folder of "
        "images, a CIFAR-10 copy (train/ test/), or a Fashion-MNIST IDX "
        "folder; 'builtin:photos' uses natural photos bundled with "
        "scikit-image",
        default=None,
    )
    kind: str = doc(
        "auto | imagefolder | folder | fmnist | photos | wds (WebDataset tar "
        "shards, see `mimlab shards`) | hf (Hugging Face datasets on disk: "
        "save_to_disk folder, parquet, ...)",
        default="auto",
    )
    train_split: str = doc(
        "sub-folder (or IDX prefix) used for training; '' = the root itself", default="train"
    )
    val_split: str = doc("sub-folder used for evaluation", default="test")
    mean: Optional[list[float]] = doc(
        "per-channel mean; null = the known value for CIFAR-10 (a path containing 'cifar') or "
        "Fashion-MNIST, else ImageNet's for 3 channels and 0.5 otherwise (nothing is measured: "
        "`mimlab stats DATA` does; each run logs the values it uses)",
        default=None,
    )
    std: Optional[list[float]] = doc("per-channel std; null = as for mean", default=None)
    crop_scale: list[float] = doc(
        "RandomResizedCrop scale range", default_factory=lambda: [0.2, 1.0]
    )
    hflip: bool = doc("random horizontal flip during training", default=True)
    num_workers: Optional[int] = doc(
        "data-loader worker processes; null = from the visible cores: cores per process "
        "(visible cores / LOCAL_WORLD_SIZE) - 1, at most 16",
        default=None,
    )
    prefetch: int = doc("batches each data-loader worker prepares ahead", default=4)
    limit: Optional[int] = doc("use only this many training images (seeded subset)", default=None)
    val_limit: Optional[int] = doc(
        "evaluate on only this many held-out images (seeded, class-balanced subset; null = all)",
        default=None,
    )
    subset: str = doc(
        "how --limit picks images: random | one_per_class | one_class", default="random"
    )
    subset_seed: Optional[int] = doc(
        "seed of the limit / label_fraction / val_limit / holdout "
        "subsets; null = run.seed (set it to keep the same images "
        "across training seeds)",
        default=None,
    )
    holdout: float = doc(
        "hold out this class-balanced fraction of the training images as the "
        "evaluation split (hyper-parameter selection without the test split); "
        "0 = evaluate on val_split",
        default=0.0,
    )
    repeat: int = doc("repeat a small training set this many times per epoch", default=1)
    resident: bool = doc(
        "pretraining: decode the training set once and keep it as uint8 on the training "
        "device; random resized crop, flip and normalisation run per batch there (CIFAR-scale "
        "data on a GPU; image folders and arrays, not shards; see mimlab.data.resident)",
        default=False,
    )
    on_bad: str = doc("unreadable images: skip (count and log them) | error", default="skip")
    shuffle_buffer: int = doc(
        "wds: undecoded samples each loader worker shuffles in (memory: "
        "this x the mean file size per worker)",
        default=2048,
    )
    image_key: Optional[str] = doc(
        "wds: the sample entry holding the image (null = the first "
        "image extension); hf: the image column (null = the first "
        "Image feature)",
        default=None,
    )
    label_key: Optional[str] = doc(
        "wds: the entry holding the class index (null = cls); hf: "
        "the label column (null = the ClassLabel feature or 'label')",
        default=None,
    )


@dataclass
class OptimConfig:
    epochs: int = doc("training epochs", default=10)
    batch_size: int = doc("per-process batch size", default=128)
    accum_steps: int = doc(
        "gradient accumulation steps (effective batch = batch*accum*world)", default=1
    )
    lr: Optional[float] = doc(
        "absolute learning rate; null = base_lr * eff_batch / 256", default=None
    )
    base_lr: float = doc("learning rate for an effective batch of 256", default=1.5e-4)
    min_lr: float = doc("final learning rate of the cosine schedule", default=0.0)
    warmup_epochs: float = doc("linear warm-up length in epochs", default=1.0)
    weight_decay: float = doc(
        "AdamW weight decay (not applied to norms, biases, tokens)", default=0.05
    )
    betas: list[float] = doc("AdamW betas", default_factory=lambda: [0.9, 0.95])
    clip_grad: Optional[float] = doc("gradient-norm clipping; null = off", default=None)
    layer_decay: Optional[float] = doc(
        "layer-wise lr decay (fine-tuning); 1.0 = off; null "
        "(fine-tuning default) = 0.75 from a pretrained encoder, "
        "1.0 from scratch",
        default=1.0,
    )
    fused: bool = doc("use the fused/foreach AdamW kernel where available", default=True)


@dataclass
class RunConfig:
    out_dir: str = doc("parent folder of run directories", default="runs")
    name: Optional[str] = doc("run directory name; null = <command>-<timestamp>", default=None)
    seed: int = doc("random seed", default=0)
    device: str = doc("auto | cpu | cuda | cuda:N", default="auto")
    precision: str = doc(
        "auto | fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)", default="auto"
    )
    ckpt_every: int = doc("write checkpoint-epochN every N epochs (0 = only 'last')", default=0)
    save_every_steps: int = doc(
        "also refresh checkpoints/last.pt every N optimizer steps "
        "(0 = only at epoch ends); bounds the work lost to a kill",
        default=0,
    )
    log_every: int = doc("log metrics every N optimizer steps", default=10)
    max_steps: Optional[int] = doc(
        "stop after this many optimizer steps (smoke tests)", default=None
    )
    stop_at_step: Optional[int] = doc(
        "write a checkpoint and stop after this optimizer step "
        "without changing the schedule (run in chunks)",
        default=None,
    )
    resume: Optional[str] = doc(
        "checkpoint path, or 'auto' = the run directory's last checkpoint", default=None
    )
    progress: bool = doc("show a progress bar", default=True)
    trust_checkpoints: bool = doc(
        "load checkpoints with full pickle (weights_only=False); only "
        "for files from a trusted source",
        default=False,
    )
    nonfinite_skip: int = doc(
        "skip up to this many batches with a non-finite loss before stopping", default=0
    )
    compile: Union[bool, str] = doc(
        "torch.compile: true wraps the whole model; 'blocks' compiles each transformer "
        "block in place (encoder, decoder, target encoder: no graph break, parameter names "
        "unchanged); false: eager",
        default=False,
    )
    parallel: str = doc(
        "ddp | fsdp: how torchrun processes share the model (ddp: a replica per process; "
        "fsdp: FSDP2 fully_shard per transformer block plus the root, sharded "
        "checkpoints checkpoints/<name>.dcp; pretraining only)",
        default="ddp",
    )
    overwrite: bool = doc(
        "replace an earlier run in run.out_dir/run.name (its config, logs, metrics and "
        "checkpoints); without it such a directory is refused unless run.resume continues it",
        default=False,
    )


@dataclass
class MethodConfig:
    """The unified view of MIM: masking (T1/T2) + target + target normalisation + student mode
    + head + loss. ``name`` selects a preset (:data:`mimlab.core.registry.PRESETS`) that fills every
    field not set explicitly; any combination can also be written out field by field in YAML;
    the family of the method (:func:`mimlab.core.registry.family_of`) says which fields it reads."""

    name: str = doc(
        "method preset: " + " | ".join(PRESETS) + " (`mimlab methods` lists what each composes)",
        default="mae",
    )
    # --- transformations
    mask: str = doc("T1 patch masking: random | block | none", default="random")
    mask_ratio: float = doc("fraction of patches removed by T1, in (0, 1)", default=0.75)
    view2: str = doc(
        "siamese T2: complement (of T1) | independent (own mask) | identity (T2(x)=x)"
        " | crop (second crop-and-jitter view, MoCo v3) | none",
        default="none",
    )
    view2_mask_ratio: float = doc("mask ratio of an independent T2", default=0.25)
    color_jitter: str = doc(
        "colour jitter: none | after_mask (C-MAE, both views) | whole "
        "(before masking) | unmasked (only the input, target unchanged)",
        default="none",
    )
    cutmix: bool = doc(
        "add cutmix between images of the batch to the input (Table 5)", default=False
    )
    # --- student
    student: str = doc("how the encoder hides patches: drop (MAE) | mask_token", default="drop")
    # --- target
    target: str = doc(
        "pixels | teacher (frozen network) | ema (EMA of the student) | hog | "
        "online (the student itself on T2, R-MAE)",
        default="pixels",
    )
    teacher: str = doc(
        "teacher spec for target=teacher: effnet_lite0 | hog | timm:<name>@<path> "
        "| torchvision:<name>@<path> | open_clip:<model>@<path> | hf_clip:<path> "
        "| mimlab:<checkpoint>",
        default="effnet_lite0",
    )
    teacher_size: Optional[int] = doc("teacher input resolution; null = its default", default=None)
    cache_teacher: bool = doc(
        "precompute teacher features once (needs a fixed augmentation)", default=False
    )
    ema_momentum: float = doc("EMA momentum of target networks", default=0.996)
    ema_top_k: int = doc("data2vec-style EMA target: average of the top-K block outputs", default=6)
    target_norm: str = doc(
        "patch (per-patch, MAE norm_pix) | layernorm (no affine) | instance | none", default="patch"
    )
    # --- head
    head: str = doc(
        "decoder (MAE transformer decoder) | linear | mlp (projector + predictor)",
        default="decoder",
    )
    proj_hidden: Optional[int] = doc(
        "projector/predictor hidden width; null = 2048 * D/768", default=None
    )
    proj_dim: Optional[int] = doc("projector output width; null = D", default=None)
    # --- loss
    loss: str = doc("l2 | l1 | smooth_l1 | cosine | infonce | byol | ce", default="l2")
    loss_beta: float = doc("smooth-L1 beta", default=2.0)
    temperature: float = doc("InfoNCE temperature", default=0.2)
    tokens: str = doc(
        "contrastive tokens: patch (token-wise) | patch+cls | cls | avg "
        "(instance-wise on averaged patch tokens)",
        default="patch",
    )
    negatives: str = doc(
        "token-wise InfoNCE negatives: position (the same position in every "
        "image of the global batch: Eq. 11 applied to each patch token like "
        "to the class token; the position embedding is no shortcut) | image "
        "(the other tokens of the same image) | batch (all tokens of the "
        "global batch, computed in chunks)",
        default="position",
    )
    queries: str = doc(
        "token-wise queries with mask tokens: all (every patch token, Table 3: "
        "'to each patch token respectively') | removed (only the patches T1 "
        "removes and T2 sees)",
        default="all",
    )
    cls_term: str = doc(
        "tokens=patch+cls: instance (class token contrasted with the other "
        "images' class tokens, one more term of the average) | joint (class "
        "token joins the token set under method.negatives)",
        default="instance",
    )
    nce_chunk: int = doc(
        "negatives=batch: queries per chunk of the InfoNCE logits (memory "
        "chunk x global batch tokens: lower it for large global batches)",
        default=1024,
    )
    lam: float = doc("R-MAE: weight of the auto-encoding constraint term (Eq. 8)", default=1.0)
    rmae_stopgrad: bool = doc(
        "R-MAE: stop the gradient of the T2 branch in the distance term "
        "(Eq. 8 has none; false = as in the paper)",
        default=False,
    )
    symmetric: bool = doc(
        "siamese infonce/byol: also swap T1 and T2 (online <-> target) and "
        "average the two losses (MoCo v3)",
        default=False,
    )
    ema_schedule: str = doc(
        "EMA momentum of siamese target networks: fixed | cosine (from "
        "ema_momentum up to 1 over training, MoCo v3 / BYOL)",
        default="fixed",
    )
    proj_norm: str = doc(
        "normalisation inside projector / predictor MLPs: bn (MoCo v3) | ln | none", default="bn"
    )


@dataclass
class EvalConfig:
    """Online evaluation during pretraining (mimlab/train/online.py)."""

    online_every: int = doc(
        "run weighted k-NN on a fixed labelled subset every N optimizer "
        "steps, at the start and at the end (0 = off); needs labelled data "
        "with a held-out split; logged as kind 'online' and drawn to "
        "online_eval.png",
        default=0,
    )
    online_bank: int = doc(
        "k-NN bank: this many training images (class-balanced, seeded, "
        "evaluation transform; data.limit ignored)",
        default=2000,
    )
    online_queries: int = doc(
        "k-NN queries: this many held-out images (data.val_split, or the "
        "data.holdout part; class-balanced, seeded)",
        default=1000,
    )
    online_k: int = doc("k-NN neighbours", default=20)
    online_temperature: float = doc("k-NN vote weight exp(cosine / T): T", default=0.07)
    online_feature: str = doc("pooled feature: avg (mean of patch tokens) | cls", default="avg")
    online_probe: bool = doc(
        "also train a linear probe on the cached bank features (lr "
        "chosen on 10 % of the bank) and score the queries",
        default=False,
    )
    online_probe_lrs: list[float] = doc(
        "learning rates of the online linear probe",
        default_factory=lambda: [0.3, 0.1, 0.03, 0.01, 0.003],
    )
    online_probe_epochs: int = doc(
        "epochs of the online linear probe over the bank features", default=50
    )


@dataclass
class LogConfig:
    """Extra metric sinks (mimlab/io/tracking.py); metrics.jsonl/csv and TensorBoard always run."""

    wandb: bool = doc(
        "also log to Weights & Biases (pip install 'mimlab[track]'); "
        "WANDB_MODE=offline or log.wandb_mode=offline writes a local run under "
        "<run dir>/wandb",
        default=False,
    )
    wandb_project: str = doc("W&B project", default="mimlab")
    wandb_mode: Optional[str] = doc(
        "W&B mode: online | offline | disabled; null = WANDB_MODE or wandb's default", default=None
    )
    mlflow: bool = doc("also log to MLflow (pip install 'mimlab[track]')", default=False)
    mlflow_uri: Optional[str] = doc(
        "MLflow tracking URI; null = a local file store <run dir>/mlruns", default=None
    )
    mlflow_experiment: str = doc("MLflow experiment name", default="mimlab")


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class FinetuneOptions:
    pretrained: Optional[str] = doc(
        "model to start from: a mimlab checkpoint path or a model "
        "source (mimlab: | mae: | timm: | hf: | mocov3:); null = "
        "random init",
        default=None,
    )
    num_classes: Optional[int] = doc("number of classes; null = from the dataset", default=None)
    mixup: float = doc("mixup alpha (0 = off)", default=0.8)
    cutmix: float = doc("cutmix alpha (0 = off)", default=1.0)
    mix_prob: float = doc("probability of applying mixup/cutmix to a batch", default=1.0)
    label_smoothing: float = doc("label smoothing", default=0.1)
    label_fraction: float = doc(
        "fraction of training labels used (class-balanced, seeded)", default=1.0
    )
    eval_every: int = doc(
        "evaluate on the held-out split every N epochs (0 = only at the end)", default=0
    )
    eval_at: list[int] = doc(
        "also evaluate after these epochs (e.g. [2, 5, 10]); results.json keeps top-1 at every "
        "evaluation as `curve`. Evaluations do not change the training's random stream",
        default_factory=list,
    )
    shape_bias: Optional[str] = doc(
        "cue-conflict stimulus folder (e.g. ../shared/data/cue-conflict): right after "
        "fine-tuning, score the model's shape bias with the CIFAR-10 protocol (its classes "
        "must include airplane, automobile, bird, cat, dog, ship, truck) and record it in "
        "results.json under shape_bias; null = off",
        default=None,
    )


def _ft_optim() -> OptimConfig:
    return OptimConfig(
        epochs=10,
        base_lr=1e-3,
        betas=[0.9, 0.999],
        layer_decay=None,
        warmup_epochs=1.0,
        weight_decay=0.05,
        min_lr=1e-6,
    )


def _ft_model() -> ModelConfig:
    return ModelConfig(drop_path=0.1)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=_ft_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=_ft_optim)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class ProbeOptions:
    pretrained: Optional[str] = doc(
        "model to probe: a mimlab checkpoint path or a model source "
        "(mimlab: | mae: | timm: | hf: | mocov3:); null = random init",
        default=None,
    )
    lrs: list[float] = doc(
        "learning rates swept in one pass on cached features",
        default_factory=lambda: [0.3, 0.1, 0.03, 0.01, 0.003],
    )
    lr_extend: int = doc(
        "while the best lr is the largest (smallest) tried and strictly better than the rest, "
        "also try it x3 (/3), at most this often (0: only probe.lrs)",
        default=3,
    )
    epochs: int = doc("epochs over the cached features", default=50)
    batch_size: int = doc("batch size over cached features", default=256)
    weight_decay: float = doc("weight decay of the linear heads", default=0.0)
    feature: str = doc("pooled feature: avg (mean of patch tokens) | cls", default="avg")
    k: int = doc("k-NN: neighbours", default=20)
    temperature: float = doc("k-NN: temperature of the weighted vote", default=0.07)
    label_fraction: float = doc("fraction of training labels used", default=1.0)


def _probe_data() -> DataConfig:
    return DataConfig(hflip=False)


@dataclass
class ProbeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=_probe_data)
    run: RunConfig = field(default_factory=RunConfig)
    probe: ProbeOptions = field(default_factory=ProbeOptions)


@dataclass
class SegmentOptions:
    """Semantic segmentation fine-tuning (``mimlab segment``, :mod:`mimlab.eval.segment`)."""

    pretrained: Optional[str] = doc(
        "backbone to start from: a mimlab checkpoint path or a model source (mimlab: | mae: | "
        "timm: | hf: | mocov3:); position embeddings are resampled to segment.crop_size; "
        "null = random init",
        default=None,
    )
    dataset: str = doc(
        "auto | ade20k (ADEChallengeData2016: images/{training,validation}, annotations with "
        "0 = ignore, 150 classes) | camvid (images/<split>, annotations/<split>, 11 classes, "
        "11 = void) | generic (segment.images + segment.masks, segment.num_classes, "
        "segment.ignore_index); auto: ade20k when data.path has images/training, camvid when "
        "its name says so, else generic",
        default="auto",
    )
    images: str = doc(
        "generic: image folder, relative to data.path; {split} becomes the split name",
        default="images/{split}",
    )
    masks: str = doc(
        "generic: mask folder (PNGs of class ids, same file stems as the images), relative "
        "to data.path; {split} becomes the split name",
        default="annotations/{split}",
    )
    num_classes: Optional[int] = doc(
        "generic: number of classes (mask values 0..num_classes-1); null = the dataset's",
        default=None,
    )
    ignore_index: Optional[int] = doc(
        "generic: mask value of unlabelled pixels (not trained on, not scored); null = 255",
        default=None,
    )
    check_masks: bool = doc(
        "read every mask of the used splits before training and stop on the first with a class "
        "id out of range (sizes are always checked from the file headers)",
        default=True,
    )
    head: str = doc(
        "linear (BatchNorm + 1x1 conv on the last block's patch tokens, bilinear upsampling; "
        "DINOv2's linear protocol) | upernet (UperNet on 4 blocks made 4x, 2x, 1x, 1/2x)",
        default="upernet",
    )
    blocks: Optional[list[int]] = doc(
        "upernet: the 4 blocks (1-based) it reads; null = 1/3, 1/2, 2/3 and all of the depth "
        "(4, 6, 8, 12 of 12)",
        default=None,
    )
    channels: int = doc("upernet: channels of the decode head", default=512)
    aux_weight: float = doc(
        "upernet: weight of the auxiliary FCN head's loss on the third map (0 = no auxiliary head)",
        default=0.4,
    )
    crop_size: int = doc(
        "training crop (square, pixels) and sliding-window size; the encoder runs at it",
        default=512,
    )
    scale: list[int] = doc(
        "[long, short] side limits images are resized to (aspect kept) before the random "
        "ratio, and at test time",
        default_factory=lambda: [2048, 512],
    )
    ratio_range: list[float] = doc(
        "training: random rescale of segment.scale by a factor in [lo, hi]",
        default_factory=lambda: [0.5, 2.0],
    )
    cat_max_ratio: float = doc(
        "training: re-draw a crop (up to 10 times) while one class covers more than this "
        "fraction of its labelled pixels (1 = off)",
        default=0.75,
    )
    photometric: bool = doc(
        "training: random brightness, contrast, saturation and hue (each with probability 0.5)",
        default=True,
    )
    iters: int = doc("optimizer steps of training (optim.epochs follows from it)", default=160000)
    warmup_iters: int = doc("linear warm-up steps", default=1500)
    poly_power: float = doc(
        "poly schedule after the warm-up: lr * (1 - t) ** power down to optim.min_lr",
        default=1.0,
    )
    test_mode: str = doc(
        "inference: whole (the resized image at once, position embeddings resampled) | slide "
        "(crop_size windows, overlapping logits averaged)",
        default="slide",
    )
    stride: Optional[int] = doc(
        "slide: window stride in pixels; null = 2/3 of crop_size", default=None
    )
    eval_batch: int = doc("images per forward at test time (whole mode)", default=1)
    save_predictions: bool = doc(
        "write every evaluated image's prediction as a coloured PNG to <run>/predictions",
        default=False,
    )
    figure_images: int = doc(
        "validation images in predictions.png (image / ground truth / prediction; evenly "
        "spaced over the split; 0 = none)",
        default=4,
    )


def _seg_optim() -> OptimConfig:
    # BEiT / MAE ADE20K UperNet recipe: AdamW lr 1e-4 at batch 16, betas (0.9, 0.999),
    # weight decay 0.05, layer-wise decay 0.65 (MAE; BEiT uses 0.9 for its own backbone)
    return OptimConfig(
        epochs=1,
        batch_size=16,
        base_lr=1.6e-3,
        betas=[0.9, 0.999],
        weight_decay=0.05,
        layer_decay=0.65,
        warmup_epochs=0.0,
        min_lr=0.0,
    )


def _seg_data() -> DataConfig:
    return DataConfig(train_split="train", val_split="val")


@dataclass
class SegmentConfig:
    model: ModelConfig = field(default_factory=_ft_model)
    data: DataConfig = field(default_factory=_seg_data)
    optim: OptimConfig = field(default_factory=_seg_optim)
    run: RunConfig = field(default_factory=RunConfig)
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    log: LogConfig = field(default_factory=LogConfig)


#: ``mimlab segment --recipe NAME``: a base config (below --config and key=value overrides)
SEGMENT_RECIPES: dict[str, dict[str, Any]] = {
    # BEiT / MAE / MaskDistill ADE20K: UperNet on ViT-B/16, 512 crops, 160k iterations at
    # batch 16 (8 GPUs x 2), AdamW 1e-4, layer decay 0.65, drop path 0.1, warm-up 1500,
    # poly power 1.0, sliding-window test (stride 341)
    "ade20k_vit_b": {
        "model": {"preset": "vit_b16", "drop_path": 0.1},
        "data": {"train_split": "training", "val_split": "validation"},
        "optim": {"batch_size": 16, "lr": 1e-4, "layer_decay": 0.65, "weight_decay": 0.05},
        "segment": {
            "dataset": "ade20k",
            "head": "upernet",
            "channels": 768,
            "aux_weight": 0.4,
            "crop_size": 512,
            "scale": [2048, 512],
            "iters": 160000,
            "warmup_iters": 1500,
            "test_mode": "slide",
            "stride": 341,
        },
        "run": {"precision": "auto"},
    },
    # a CPU-sized CamVid run: 480x360 scenes at a third of their size (160x120), 96-pixel crops
    # of a mini ViT with 8-pixel patches, linear head, 300 steps of 8, whole-image test; layer
    # decay 0.75 from a pretrained backbone, none from random init
    "camvid_cpu": {
        "model": {
            "preset": "mini",
            "patch_size": 8,
            "embed_dim": 128,
            "depth": 6,
            "num_heads": 4,
            "drop_path": 0.1,
        },
        "data": {"train_split": "train", "val_split": "test", "num_workers": 1},
        "optim": {"batch_size": 8, "lr": 1e-3, "layer_decay": None, "weight_decay": 0.05},
        "segment": {
            "dataset": "camvid",
            "head": "linear",
            "crop_size": 96,
            "scale": [160, 120],
            "ratio_range": [0.75, 1.5],
            "iters": 300,
            "warmup_iters": 30,
            "test_mode": "whole",
            "eval_batch": 8,
        },
    },
}


# --------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict of YAML-safe values."""
    return dataclasses.asdict(cfg)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against a type annotation; raise ConfigError if impossible."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            name = getattr(tp, "__name__", str(tp))
            raise ConfigError(f"{key}: expected a mapping of {name} fields, got {value!r}")
        return from_dict(typing.cast(type, tp), value, prefix=key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict, strictly.

    Unknown keys raise :class:`ConfigError` with the closest valid key suggested.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    if cls is MethodConfig:
        data = method_aliases(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.5)
            hint = (
                f" (did you mean '{prefix}{close[0]}'?)"
                if close
                else f" (valid keys: {', '.join(prefix + f for f in fields)})"
            )
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    obj = cls()  # defaults, including per-section factories
    for k, v in kwargs.items():
        if dataclasses.is_dataclass(hints[k]):
            # merge partial section into the section's defaults
            base = to_dict(getattr(obj, k))
            sub: dict = data[k] or {}
            if hints[k] is MethodConfig:
                sub = method_aliases(sub)
            base.update(sub)
            v = from_dict(hints[k], base, prefix=prefix + k + ".")
        setattr(obj, k, v)
    return obj


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_overrides(items: list[str]) -> dict:
    """``["optim.lr=1e-3", "data.mean=[0.5]"]`` -> nested dict. Values are parsed as YAML."""
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override '{it}' is not of the form key=value (e.g. optim.epochs=5)")
        key, val = it.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override '{it}' has an empty key")
        try:
            parsed = yaml.safe_load(val) if val != "" else ""
        except yaml.YAMLError:
            parsed = val
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"override '{it}' conflicts with another override")
        cur[parts[-1]] = parsed
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: top level must be a mapping of sections, got {type(data).__name__}"
        )
    return data


def resolve(
    cls: type,
    yaml_path: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    base: Optional[dict] = None,
) -> Any:
    """Defaults <- base dict <- YAML file <- overrides <- model preset; then validate."""
    data: dict = {}
    if base:
        _deep_update(data, base)
    if yaml_path:
        _deep_update(data, load_yaml(yaml_path))
    if overrides:
        _deep_update(data, parse_overrides(overrides))
    model_user = dict(data.get("model") or {}) if isinstance(data.get("model"), dict) else None
    meth = data.get("method")
    meth_user = method_aliases(meth) if isinstance(meth, dict) else {}
    cfg = from_dict(cls, data)
    if hasattr(cfg, "model"):
        apply_model_preset(cfg.model, model_user or {})
    if hasattr(cfg, "method"):
        apply_method_preset(cfg.method, meth_user)
    validate(cfg, meth_user)
    return cfg


def _fill_from_preset(
    obj: Any, key: str, presets: dict, explicit: dict, choices: list[str]
) -> None:
    """Set every field of ``obj`` that the user did not give explicitly from the preset named
    by ``obj.<name>``; an unknown name fails with a did-you-mean (``key`` is its config key)."""
    name = getattr(obj, key.split(".")[-1])
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        what = "preset" if key == "model.preset" else "method"
        raise ConfigError(f"{key}: unknown {what} '{name}'{hint}; choose from {', '.join(choices)}")
    for k, v in presets[name].items():
        if k not in explicit:
            setattr(obj, k, v)


def apply_model_preset(model: ModelConfig, explicit: dict) -> None:
    """Fill the model fields the user did not set from ``model.preset``."""
    if model.preset is not None:
        _fill_from_preset(model, "model.preset", MODEL_PRESETS, explicit, list(MODEL_PRESETS))


def apply_method_preset(method: "MethodConfig", explicit: dict) -> None:
    """Fill the method fields the user did not set from the ``method.name`` preset."""
    _fill_from_preset(method, "method.name", METHOD_PRESETS, explicit, sorted(METHOD_PRESETS))


#: activation-checkpointing modes of ``model.grad_checkpointing`` (see models.run_block)
CHECKPOINTING = ("off", "selective", "full")


def visible_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm/cgroup share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def data_workers(num_workers: Optional[int]) -> int:
    """``data.num_workers``, or its default when null: the visible cores per process
    (``LOCAL_WORLD_SIZE`` processes on this machine under torchrun) minus one for the training
    loop, at most 16 (0 on a single core: load in the main process)."""
    if num_workers is not None:
        return num_workers
    per_process = visible_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(16, per_process - 1))


def checkpointing_mode(value: Any) -> str:
    """``model.grad_checkpointing`` -> 'off' | 'selective' | 'full'; booleans (the field's
    earlier type, as saved in older configs) mean 'full' (true) and 'off' (false)."""
    v = str(value).strip().lower()
    v = {
        "true": "full",
        "yes": "full",
        "1": "full",
        "false": "off",
        "no": "off",
        "0": "off",
        "none": "off",
    }.get(v, v)
    if v not in CHECKPOINTING:
        close = difflib.get_close_matches(v, CHECKPOINTING, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"model.grad_checkpointing: unknown mode {value!r}{hint}; choose from "
            f"{', '.join(CHECKPOINTING)}"
        )
    return v


def validate(cfg: Any, method_explicit: Optional[dict] = None) -> None:
    """Impossible values fail here, one clear line each. The method section is checked by
    :func:`mimlab.core.registry.check_method` (``method_explicit``: the method fields the user set,
    so that a field the method's family does not read is an error)."""
    m = getattr(cfg, "model", None)
    if m is not None:
        if m.depth < 1:
            raise ConfigError(f"model.depth must be >= 1, got {m.depth}")
        if m.patch_size < 1 or m.img_size < 1:
            raise ConfigError("model.img_size and model.patch_size must be positive")
        if m.img_size % m.patch_size:
            raise ConfigError(
                f"model.img_size {m.img_size} is not divisible by model.patch_size {m.patch_size}"
            )
        if m.embed_dim % m.num_heads:
            raise ConfigError(
                f"model.embed_dim {m.embed_dim} is not divisible by model.num_heads {m.num_heads}"
            )
        if m.decoder_embed_dim % m.decoder_num_heads:
            raise ConfigError(
                f"model.decoder_embed_dim {m.decoder_embed_dim} is not divisible by "
                f"model.decoder_num_heads {m.decoder_num_heads}"
            )
        if m.in_chans < 1:
            raise ConfigError(f"model.in_chans must be >= 1, got {m.in_chans}")
        if not 0.0 <= m.drop_path < 1.0:
            raise ConfigError(f"model.drop_path must be in [0, 1), got {m.drop_path}")
        m.grad_checkpointing = checkpointing_mode(m.grad_checkpointing)
    meth = getattr(cfg, "method", None)
    if meth is not None:
        check_method(meth, method_explicit)
        if meth.target == "hog" and m is not None and m.patch_size < 2:
            raise ConfigError(
                f"method.target=hog needs model.patch_size >= 2 (HOG cells inside "
                f"each patch), got {m.patch_size}"
            )
        if meth.cache_teacher:
            dc = getattr(cfg, "data", None)
            if dc is not None and ([float(v) for v in dc.crop_scale] != [1.0, 1.0] or dc.hflip):
                raise ConfigError(
                    "method.cache_teacher=true computes teacher features once per image, so the "
                    "augmentation must be fixed: set data.crop_scale=[1,1] and data.hflip=false "
                    f"(got data.crop_scale={dc.crop_scale}, data.hflip={dc.hflip})"
                )
    o = getattr(cfg, "optim", None)
    if o is not None:
        if o.epochs < 1:
            raise ConfigError(f"optim.epochs must be >= 1, got {o.epochs}")
        if o.batch_size < 1:
            raise ConfigError(f"optim.batch_size must be >= 1, got {o.batch_size}")
        if o.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {o.accum_steps}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if o.lr is not None and o.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        if o.layer_decay is not None and not 0 < o.layer_decay <= 1:
            raise ConfigError(f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
        if o.base_lr <= 0:
            raise ConfigError(f"optim.base_lr must be > 0, got {o.base_lr}")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        if o.clip_grad is not None and o.clip_grad <= 0:
            raise ConfigError(
                f"optim.clip_grad must be > 0 (null = no clipping), got {o.clip_grad}"
            )
    d = getattr(cfg, "data", None)
    if d is not None:
        if d.on_bad not in ("skip", "error"):
            raise ConfigError(f"data.on_bad must be 'skip' or 'error', got '{d.on_bad}'")
        if d.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
        if d.subset not in ("random", "one_per_class", "one_class"):
            raise ConfigError(
                f"data.subset must be random | one_per_class | one_class, got '{d.subset}'"
            )
        if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
            raise ConfigError(
                f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}"
            )
        if not 0 <= d.holdout < 1:
            raise ConfigError(f"data.holdout must be in [0, 1), got {d.holdout}")
        if d.val_limit is not None and d.val_limit < 1:
            raise ConfigError(f"data.val_limit must be >= 1, got {d.val_limit}")
        if d.limit is not None and d.limit < 1:
            raise ConfigError(f"data.limit must be >= 1, got {d.limit}")
        if (d.mean is None) != (d.std is None):
            raise ConfigError("data.mean and data.std must be given together")
        if d.std is not None and any(s <= 0 for s in d.std):
            raise ConfigError(f"data.std must be positive, got {d.std}")
        if d.num_workers is not None and d.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
        if d.prefetch < 1:
            raise ConfigError(f"data.prefetch must be >= 1, got {d.prefetch}")
        if d.repeat < 1:
            raise ConfigError(f"data.repeat must be >= 1, got {d.repeat}")
    r = getattr(cfg, "run", None)
    if r is not None:
        if r.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(
                f"run.precision must be auto | fp32 | bf16 | fp16, got '{r.precision}'"
            )
        if r.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"run.parallel must be ddp | fsdp, got '{r.parallel}'")
        if isinstance(r.compile, str) and r.compile != "blocks":
            raise ConfigError(f"run.compile must be true | false | blocks, got '{r.compile}'")
        if r.log_every < 1:
            raise ConfigError(f"run.log_every must be >= 1, got {r.log_every}")
        if r.save_every_steps < 0:
            raise ConfigError(f"run.save_every_steps must be >= 0, got {r.save_every_steps}")
        if r.ckpt_every < 0:
            raise ConfigError(f"run.ckpt_every must be >= 0, got {r.ckpt_every}")
        if r.max_steps is not None and r.max_steps < 1:
            raise ConfigError(f"run.max_steps must be >= 1, got {r.max_steps}")
        if r.stop_at_step is not None and r.stop_at_step < 1:
            raise ConfigError(f"run.stop_at_step must be >= 1, got {r.stop_at_step}")
        if r.nonfinite_skip < 0:
            raise ConfigError(f"run.nonfinite_skip must be >= 0, got {r.nonfinite_skip}")
        if r.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(
            r"cuda:\d+", r.device
        ):
            raise ConfigError(f"run.device must be auto | cpu | cuda | cuda:N, got '{r.device}'")
    ft = getattr(cfg, "finetune", None)
    if ft is not None and not 0 < ft.label_fraction <= 1:
        raise ConfigError(f"finetune.label_fraction must be in (0, 1], got {ft.label_fraction}")
    sg = getattr(cfg, "segment", None)
    if sg is not None:
        _check_segment(sg)
    ev = getattr(cfg, "eval", None)
    if ev is not None:
        if ev.online_every < 0:
            raise ConfigError(f"eval.online_every must be >= 0 (0 = off), got {ev.online_every}")
        for key in ("online_bank", "online_queries", "online_k", "online_probe_epochs"):
            if getattr(ev, key) < 1:
                raise ConfigError(f"eval.{key} must be >= 1, got {getattr(ev, key)}")
        if ev.online_temperature <= 0:
            raise ConfigError(f"eval.online_temperature must be > 0, got {ev.online_temperature}")
        if ev.online_feature not in ("avg", "cls"):
            raise ConfigError(f"eval.online_feature must be avg | cls, got '{ev.online_feature}'")
        if ev.online_probe and not ev.online_probe_lrs:
            raise ConfigError("eval.online_probe_lrs must list at least one learning rate")
    lg = getattr(cfg, "log", None)
    if lg is not None and lg.wandb_mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(
            f"log.wandb_mode must be online | offline | disabled | null, got '{lg.wandb_mode}'"
        )
    pr = getattr(cfg, "probe", None)
    if pr is not None:
        if pr.k < 1:
            raise ConfigError(f"probe.k must be >= 1, got {pr.k}")
        if not pr.lrs:
            raise ConfigError("probe.lrs must list at least one learning rate")
        if pr.lr_extend < 0:
            raise ConfigError(f"probe.lr_extend must be >= 0, got {pr.lr_extend}")
        if pr.temperature <= 0:
            raise ConfigError(f"probe.temperature must be > 0, got {pr.temperature}")
        if pr.epochs < 1:
            raise ConfigError(f"probe.epochs must be >= 1, got {pr.epochs}")
        if pr.batch_size < 1:
            raise ConfigError(f"probe.batch_size must be >= 1, got {pr.batch_size}")
        if pr.weight_decay < 0:
            raise ConfigError(f"probe.weight_decay must be >= 0, got {pr.weight_decay}")
        if not 0 < pr.label_fraction <= 1:
            raise ConfigError(f"probe.label_fraction must be in (0, 1], got {pr.label_fraction}")
        if r is not None and r.resume:
            raise ConfigError(
                "run.resume: knn and linprobe have nothing to resume (they finish in one pass); "
                "remove --resume / run.resume"
            )


def _check_segment(sg: "SegmentOptions") -> None:
    """One line per impossible ``segment.*`` value."""
    choices = {
        "dataset": ("auto", "ade20k", "camvid", "generic"),
        "head": ("linear", "upernet"),
        "test_mode": ("whole", "slide"),
    }
    for key, ok in choices.items():
        v = getattr(sg, key)
        if v not in ok:
            close = difflib.get_close_matches(str(v), ok, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"segment.{key}: unknown value '{v}'{hint}; choose from {' | '.join(ok)}"
            )
    if sg.num_classes is not None and sg.num_classes < 1:
        raise ConfigError(f"segment.num_classes must be >= 1, got {sg.num_classes}")
    if sg.blocks is not None and (len(sg.blocks) != 4 or any(b < 1 for b in sg.blocks)):
        raise ConfigError(f"segment.blocks must be 4 block numbers >= 1, got {sg.blocks}")
    if sg.crop_size < 1 or sg.channels < 1 or sg.iters < 1 or sg.eval_batch < 1:
        raise ConfigError(
            "segment.crop_size, segment.channels, segment.iters and segment.eval_batch must be >= 1"
        )
    if sg.warmup_iters < 0 or sg.aux_weight < 0 or sg.poly_power <= 0 or sg.figure_images < 0:
        raise ConfigError(
            "segment.warmup_iters, segment.aux_weight and segment.figure_images must be >= 0 "
            "and segment.poly_power > 0"
        )
    if len(sg.scale) != 2 or min(sg.scale) < 1:
        raise ConfigError(f"segment.scale must be [long, short] in pixels, got {sg.scale}")
    if len(sg.ratio_range) != 2 or not 0 < sg.ratio_range[0] <= sg.ratio_range[1]:
        raise ConfigError(
            f"segment.ratio_range must be [lo, hi] with 0 < lo <= hi, got {sg.ratio_range}"
        )
    if not 0 < sg.cat_max_ratio <= 1:
        raise ConfigError(f"segment.cat_max_ratio must be in (0, 1], got {sg.cat_max_ratio}")
    if sg.stride is not None and not 0 < sg.stride <= sg.crop_size:
        raise ConfigError(
            f"segment.stride must be in 1..segment.crop_size ({sg.crop_size}), got {sg.stride}"
        )


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field of a config dataclass (for --help).

    ``cls`` may be a class or an instance (its values are shown as defaults)."""
    rows = []
    inst = cls() if isinstance(cls, type) else cls
    hints = typing.get_type_hints(type(inst))
    for f in dataclasses.fields(inst):
        tp = hints[f.name]
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(tp):
            rows += describe(value, prefix + f.name + ".")
            continue
        tn = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
        rows.append((prefix + f.name, tn, repr(value), f.metadata.get("doc", "")))
    return rows
