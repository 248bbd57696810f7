"""The method registry: every method family and preset, the fields each reads, its checks.

A method is a short declaration (MaskDistill's unified view: masking + target + normalisation +
student + head + loss). Methods come in three **families**, told apart by
:func:`family_of` alone:

=============  ========================================================  =====================
family         what it composes                                          presets
=============  ========================================================  =====================
masked         one view T1; a target (pixels | teacher | hog | ema)      mae, simmim, ...
               regressed from the masked student
relaxed        R-MAE (Kong & Zhang Eq. 8): two masked views, one         rmae, rmae_indep, ...
               shared decoder, the distance between reconstructions
contrastive    C-MAE / MoCo v3 (Eq. 9-11): online encoder + projector    cmae, mocov3, ...
               + predictor vs an EMA target, InfoNCE or BYOL
=============  ========================================================  =====================

Each :class:`Family` declares the ``method.*`` fields it reads and its checks; each
:class:`Preset` its family and field values. A field set explicitly that the chosen family
does not read is a :class:`ConfigError` with a did-you-mean (a full config dump such as a run's
``config.yaml`` passes, since its unread fields keep their defaults). The builders are the
methods layer's :data:`mimlab.methods.BUILDERS`, keyed by family name (this module is below
it and imports neither torch nor the config dataclasses).

To add a preset, add one :class:`Preset` to :data:`PRESETS` (and its optimiser settings to
:mod:`mimlab.core.paper_settings`); tests, ``mimlab methods`` and ``--help`` pick it up from here.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from .errors import ConfigError

# --------------------------------------------------------------------------------------
# Choices of the method fields (one place; the methods layer imports them from here)
# --------------------------------------------------------------------------------------
MASKS = ("random", "block", "none")
VIEW2 = ("none", "complement", "independent", "identity", "crop")
JITTERS = ("none", "after_mask", "whole", "unmasked")
STUDENTS = ("drop", "mask_token")
TARGETS = ("pixels", "teacher", "hog", "ema", "online")
TARGET_NORMS = ("patch", "layernorm", "instance", "none")
HEADS = ("decoder", "linear", "mlp")
REGRESSION_LOSSES = ("l2", "l1", "smooth_l1", "cosine")
CONTRASTIVE_LOSSES = ("infonce", "byol")
TOKENS = ("patch", "patch+cls", "cls", "avg")
NEGATIVES = ("position", "image", "batch")
QUERIES = ("all", "removed")
CLS_TERMS = ("instance", "joint")
EMA_SCHEDULES = ("fixed", "cosine")
PROJ_NORMS = ("bn", "ln", "none")


@dataclass(frozen=True)
class Family:
    """A method family: ``reads`` the ``method.*`` fields its builder uses; ``check(m)`` raises
    :class:`ConfigError` on an invalid combination within the family."""

    name: str
    title: str
    reads: frozenset
    check: Callable[[Any], None]
    about: str


@dataclass(frozen=True)
class Preset:
    """``method.name=<name>``: fills every field of ``values`` the user did not set."""

    name: str
    family: str
    values: Mapping[str, Any]
    about: str


def _one_of(m: Any, key: str, choices: Sequence[str]) -> None:
    v = getattr(m, key)
    if v not in choices:
        raise ConfigError(f"method.{key}: '{v}' is not one of {' | '.join(choices)}")


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------
def _check_without_masking(m: Any) -> None:
    """Table 5's "removing patch masking" (``mask=none``) for masked prediction (MAE:
    reconstruct the original image from its augmented version) and C-MAE (two independently
    augmented views): the augmentation must make input and target differ."""
    if m.mask != "none" or m.view2 == "crop" or m.target == "online":
        return
    if m.color_jitter == "whole":
        raise ConfigError(
            "method.mask=none with method.color_jitter=whole: without patch "
            "masking the jitter must differ between input and target (MAE: "
            "input only) or between the views (C-MAE: one jitter per view); use "
            "method.color_jitter=after_mask | unmasked"
        )
    if not m.cutmix and m.color_jitter == "none":
        raise ConfigError(
            "method.mask=none with method.cutmix=false and "
            "method.color_jitter=none leaves input and target identical (the "
            "identity map / identical views solve it): add method.cutmix=true "
            "or method.color_jitter=after_mask"
        )


def _check_common(m: Any) -> None:
    """Checks of the fields every family reads (views, augmentation, student)."""
    _one_of(m, "mask", MASKS)
    _one_of(m, "view2", VIEW2)
    _one_of(m, "color_jitter", JITTERS)
    _one_of(m, "student", STUDENTS)
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"method.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    _check_without_masking(m)


def _check_masked(m: Any) -> None:
    _one_of(m, "target_norm", TARGET_NORMS)
    if m.target not in ("pixels", "teacher", "hog", "ema"):
        raise ConfigError(
            f"method.target: '{m.target}' is not available for masked prediction "
            "(pixels | teacher | hog | ema)"
        )
    if m.loss not in REGRESSION_LOSSES:
        raise ConfigError(
            f"method.loss: masked prediction regresses its target; use one of "
            f"{', '.join(REGRESSION_LOSSES)} (got '{m.loss}')"
        )
    if m.head not in ("decoder", "linear"):
        raise ConfigError(
            f"method.head: '{m.head}' is not a masked-prediction head (decoder | linear)"
        )
    if m.student == "drop" and m.head == "linear":
        raise ConfigError(
            "method.head=linear needs method.student=mask_token (a linear head "
            "predicts from the masked positions' own tokens)"
        )
    if m.target == "teacher" and m.teacher_size is not None and m.teacher_size < 32:
        raise ConfigError(
            f"method.teacher_size {m.teacher_size} is too small: the "
            "teacher's feature grid cannot be matched to the student's "
            "(CNN teachers have stride 32); use >= 32 or null"
        )
    if m.cache_teacher:
        if m.target not in ("teacher", "hog"):
            raise ConfigError(
                f"method.cache_teacher caches a frozen teacher's features: it "
                f"needs method.target=teacher | hog, got '{m.target}'"
            )
        if m.cutmix or m.color_jitter == "whole":
            raise ConfigError(
                "method.cache_teacher=true stores teacher features of "
                "un-augmented images: it cannot be combined with "
                "method.cutmix=true or method.color_jitter=whole (they change "
                "the target images)"
            )


def _check_siamese(m: Any) -> None:
    if m.view2 == "none":
        raise ConfigError(
            f"method.loss={m.loss} / target={m.target} is a siamese method and "
            "needs a second view: set method.view2=complement | independent | "
            "identity | crop"
        )
    if m.view2 == "independent" and not 0.0 < m.view2_mask_ratio < 1.0:
        raise ConfigError(f"method.view2_mask_ratio must be in (0, 1), got {m.view2_mask_ratio}")


def _check_relaxed(m: Any) -> None:
    """R-MAE (``target=online``)."""
    _check_siamese(m)
    _one_of(m, "target_norm", TARGET_NORMS)
    if m.loss not in REGRESSION_LOSSES:
        raise ConfigError(
            f"R-MAE (method.target=online) compares decoder reconstructions: "
            f"method.loss must be {' | '.join(REGRESSION_LOSSES)}, got "
            f"'{m.loss}' (contrastive losses need method.target=ema)"
        )
    if m.head != "decoder":
        raise ConfigError(
            f"R-MAE (method.target=online) needs method.head=decoder (the "
            f"shared decoder of Eq. 8), got '{m.head}'"
        )
    if m.mask == "none":
        raise ConfigError(
            "R-MAE (method.target=online) needs T1 patch masking: method.mask=random | block"
        )
    if m.view2 == "crop":
        raise ConfigError(
            "R-MAE (method.target=online) compares reconstructions of the same "
            "image: method.view2 must be complement | independent | identity"
        )
    if m.color_jitter in ("after_mask", "unmasked"):
        raise ConfigError(
            f"R-MAE compares reconstructions of one image: "
            f"method.color_jitter must be none | whole, got '{m.color_jitter}'"
        )
    if m.symmetric:
        raise ConfigError(
            "method.symmetric applies to infonce / byol siamese methods, not "
            "R-MAE (method.target=online)"
        )


def _check_contrastive(m: Any) -> None:
    """C-MAE / MoCo v3 (and any method with a second view and a contrastive loss)."""
    _check_siamese(m)
    _one_of(m, "ema_schedule", EMA_SCHEDULES)
    _one_of(m, "proj_norm", PROJ_NORMS)
    if m.loss not in CONTRASTIVE_LOSSES:
        raise ConfigError(
            f"a siamese method with method.target={m.target} needs method.loss="
            f"infonce | byol (got '{m.loss}'); R-MAE regression is target=online"
        )
    if m.target != "ema":
        raise ConfigError(
            f"method.loss={m.loss} compares the online branch with an EMA target "
            f"encoder: set method.target=ema (got '{m.target}')"
        )
    if m.head != "mlp":
        raise ConfigError(
            f"method.loss={m.loss} compares projected embeddings: set "
            f"method.head=mlp (projector + predictor), got '{m.head}'"
        )
    _one_of(m, "tokens", TOKENS)
    _one_of(m, "negatives", NEGATIVES)
    _one_of(m, "queries", QUERIES)
    _one_of(m, "cls_term", CLS_TERMS)
    if m.nce_chunk < 1:
        raise ConfigError(f"method.nce_chunk must be >= 1, got {m.nce_chunk}")
    if not 0.0 <= m.ema_momentum <= 1.0:
        raise ConfigError(f"method.ema_momentum must be in [0, 1], got {m.ema_momentum}")
    if m.temperature <= 0:
        raise ConfigError(f"method.temperature must be > 0, got {m.temperature}")
    for k in ("proj_hidden", "proj_dim"):
        if getattr(m, k) is not None and getattr(m, k) < 1:
            raise ConfigError(f"method.{k} must be >= 1 (or null), got {getattr(m, k)}")
    if m.tokens in ("patch", "patch+cls"):
        if m.view2 == "crop":
            raise ConfigError(
                "method.tokens=patch pairs tokens at the same position, but "
                "view2=crop views do not share positions: use tokens=cls | avg"
            )
        if m.student == "drop" and m.view2 == "complement" and m.mask != "none":
            raise ConfigError(
                "method.tokens=patch with method.student=drop: complementary views "
                "share no visible position (so cmae_nomask is instance-wise, "
                "tokens=avg); use student=mask_token, tokens=avg | cls, or "
                "view2=identity | independent"
            )
        if (
            m.symmetric
            and m.view2 == "identity"
            and m.student == "mask_token"
            and m.queries == "removed"
            and m.mask != "none"
        ):
            raise ConfigError(
                "method.symmetric=true with view2=identity and queries=removed: "
                "the swapped direction has no removed patch to predict; set "
                "method.symmetric=false or method.queries=all"
            )


# --------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------
#: fields every family reads: the views (T1 / T2), the augmentation, the student, and the
#: three selectors of the family (target, loss, head)
COMMON_FIELDS = frozenset(
    {
        "name",
        "mask",
        "mask_ratio",
        "view2",
        "color_jitter",
        "cutmix",
        "student",
        "target",
        "loss",
        "head",
    }
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "masked",
            "masked prediction",
            COMMON_FIELDS
            | {
                "teacher",
                "teacher_size",
                "cache_teacher",
                "ema_momentum",
                "ema_top_k",
                "target_norm",
                "loss_beta",
            },
            _check_masked,
            "one masked view; the student regresses a target of the masked patches "
            "(methods/masked.py, methods/targets.py)",
        ),
        Family(
            "relaxed",
            "relaxed MAE (R-MAE)",
            COMMON_FIELDS
            | {"view2_mask_ratio", "target_norm", "loss_beta", "lam", "rmae_stopgrad"},
            _check_relaxed,
            "two masked views reconstructed by one shared decoder; distance between the "
            "reconstructions + lam x auto-encoding constraint (Eq. 8, methods/siamese.py)",
        ),
        Family(
            "contrastive",
            "contrastive siamese",
            COMMON_FIELDS
            | {
                "view2_mask_ratio",
                "ema_momentum",
                "ema_schedule",
                "proj_hidden",
                "proj_dim",
                "proj_norm",
                "temperature",
                "tokens",
                "negatives",
                "queries",
                "cls_term",
                "nce_chunk",
                "symmetric",
            },
            _check_contrastive,
            "online encoder + projector + predictor against an EMA target encoder on a second "
            "view, InfoNCE or BYOL (Eq. 9-11, methods/siamese.py, methods/contrastive.py)",
        ),
    )
}


def family_of(m: Any) -> Family:
    """The family a method config belongs to (the one rule: R-MAE's ``target=online``; a
    second view or a contrastive loss makes a contrastive siamese method; else masked)."""
    if m.target == "online":
        return FAMILIES["relaxed"]
    if m.view2 != "none" or m.loss in CONTRASTIVE_LOSSES:
        return FAMILIES["contrastive"]
    return FAMILIES["masked"]


# --------------------------------------------------------------------------------------
# Presets. Paper settings of the optimiser: mimlab/core/paper_settings.py.
# --------------------------------------------------------------------------------------
# R-MAE (Kong & Zhang, Sec. 5): mask ratio 0.75 and "lambda is set to 1 for ours"; one decoder
# ("we let phi = phi'").
_RMAE = dict(
    mask="random",
    mask_ratio=0.75,
    view2="complement",
    view2_mask_ratio=0.25,
    student="drop",
    target="online",
    target_norm="patch",
    head="decoder",
    loss="l2",
    lam=1.0,
    rmae_stopgrad=False,
    color_jitter="none",
    cutmix=False,
)
# C-MAE: "the momentum to update the teacher model is set to 0.996, and the temperature to
# compute contrastive loss is set to 0.2. For projector and predictor heads, we set 2048-d for
# hidden layers, and 768-d for output layers" (proj_hidden/proj_dim null = 2048 x D/768 and D:
# exactly 2048 / 768 at ViT-B, scaled with the width of smaller models); "2-layer projector ...
# 2-layer predictor ... GELU"; "learnable mask tokens"; colour jitter after masking, "follows
# SimSiam". Token-wise (Table 3's default) on every patch token with position negatives and the
# class-token term instance-wise: the readings argued in methods/siamese.py.
_CMAE = dict(
    mask="random",
    mask_ratio=0.75,
    view2="complement",
    student="mask_token",
    target="ema",
    ema_momentum=0.996,
    ema_schedule="fixed",
    head="mlp",
    proj_hidden=None,
    proj_dim=None,
    proj_norm="bn",
    loss="infonce",
    temperature=0.2,
    tokens="patch",
    negatives="position",
    queries="all",
    cls_term="instance",
    symmetric=False,
    color_jitter="after_mask",
    cutmix=False,
)

# SimMIM (Xie et al., 2022): random masking 60 %, mask tokens, a linear head to raw pixels, l1
_SIMMIM = dict(
    mask="random",
    mask_ratio=0.6,
    view2="none",
    student="mask_token",
    target="pixels",
    target_norm="none",
    head="linear",
    loss="l1",
    color_jitter="none",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # MAE (He et al.; Kong & Zhang Sec. 5: "We use the mask ratio of 0.75 ... use the patch
        # normalization when computing loss"). method.mask=none (Table 5): reconstruct the original
        # image from its cutmix / jittered version, loss over every patch (methods/masked.py).
        Preset(
            "mae",
            "masked",
            dict(
                mask="random",
                mask_ratio=0.75,
                view2="none",
                student="drop",
                target="pixels",
                target_norm="patch",
                head="decoder",
                loss="l2",
                color_jitter="none",
            ),
            "MAE: drop 75 % of the patches, decoder regresses their per-patch normalised pixels",
        ),
        # R-MAE, Eq. 8: T1 random 75 %, T2 = complement; one shared MAE decoder; distance between
        # the two reconstructions + lam * auto-encoding constraint, on patches T1 removes, T2 sees
        Preset(
            "rmae",
            "relaxed",
            dict(_RMAE),
            "R-MAE (Eq. 8): T2 = complement of T1, shared decoder, lam = 1",
        ),
        # R-MAE-dagger (Table 1): "T2 is randomly sampled with mask ratio of 25%"
        Preset(
            "rmae_indep",
            "relaxed",
            dict(_RMAE, view2="independent", view2_mask_ratio=0.25),
            "R-MAE-dagger (Tab. 1): T2 an independent 25 % mask",
        ),
        # R-MAE-double-dagger (Table 1): "T2(x) = x", the constraint is a plain auto-encoder
        Preset(
            "rmae_identity",
            "relaxed",
            dict(_RMAE, view2="identity"),
            "R-MAE-double-dagger (Tab. 1): T2(x) = x",
        ),
        # C-MAE, Eq. 9-11: mask tokens, EMA target (0.996), projector + predictor, token-wise
        # InfoNCE (tau 0.2) on every patch token, SimSiam colour jitter after masking
        Preset(
            "cmae",
            "contrastive",
            dict(_CMAE),
            "C-MAE (Eq. 9-11): mask tokens, EMA target, token-wise InfoNCE on every patch token",
        ),
        # Table 3: instance-wise on the class token / on the average of patch tokens; token-wise
        # on patch tokens plus the class token (instance-wise class-token term, method.cls_term)
        Preset(
            "cmae_cls",
            "contrastive",
            dict(_CMAE, tokens="cls"),
            "C-MAE, Tab. 3: instance-wise on the class token",
        ),
        Preset(
            "cmae_avg",
            "contrastive",
            dict(_CMAE, tokens="avg"),
            "C-MAE, Tab. 3: instance-wise on the average of patch tokens",
        ),
        Preset(
            "cmae_patch_cls",
            "contrastive",
            dict(_CMAE, tokens="patch+cls"),
            "C-MAE, Tab. 3: token-wise plus an instance-wise class-token term",
        ),
        # Table 4: BYOL loss ("we still make the BYOL loss in tokenwise manner"); without mask
        # tokens ("remove the mask tokens as done in MAE's encoder"): with complementary views no
        # position has an online and a target token, so these are instance-wise on averaged tokens
        # -- cmae_nomask differs from cmae_avg in the mask tokens only (methods/siamese.py)
        Preset(
            "cmae_byol",
            "contrastive",
            dict(_CMAE, loss="byol"),
            "C-MAE, Tab. 4: token-wise BYOL loss",
        ),
        Preset(
            "cmae_nomask",
            "contrastive",
            dict(_CMAE, student="drop", tokens="avg"),
            "C-MAE, Tab. 4: without mask tokens (instance-wise on averaged tokens, as cmae_avg)",
        ),
        Preset(
            "cmae_nomask_byol",
            "contrastive",
            dict(_CMAE, student="drop", tokens="avg", loss="byol"),
            "C-MAE, Tab. 4: without mask tokens, BYOL loss",
        ),
        # MoCo v3 (Chen et al., 2021): two crop-and-jitter views, no masking, EMA key encoder
        # (0.99 -> 1 cosine), projector + predictor, symmetric InfoNCE on the class token
        Preset(
            "mocov3",
            "contrastive",
            dict(
                mask="none",
                view2="crop",
                student="drop",
                target="ema",
                ema_momentum=0.99,
                ema_schedule="cosine",
                head="mlp",
                proj_hidden=None,
                proj_dim=None,
                proj_norm="bn",
                loss="infonce",
                temperature=0.2,
                tokens="cls",
                negatives="position",
                symmetric=True,
                color_jitter="after_mask",
                cutmix=False,
            ),
            "MoCo v3: two crop-and-jitter views, EMA keys, symmetric InfoNCE on the class token",
        ),
        # MaskDistill (Peng et al., "A Unified View of MIM", 2022): BEiT block masking 40 %, mask
        # tokens, a frozen teacher's features normalised by LayerNorm without affine, one linear
        # layer, smooth-l1 (beta 2) on the masked tokens; method.loss=l2 | cosine are the paper's
        # ablations. The paper's teacher is CLIP ViT-B/16
        # (method.teacher=open_clip:ViT-B-16@<ckpt>); the offline default is ImageNet
        # EfficientNet-Lite0.
        Preset(
            "maskdistill",
            "masked",
            dict(
                mask="block",
                mask_ratio=0.4,
                view2="none",
                student="mask_token",
                target="teacher",
                teacher="effnet_lite0",
                target_norm="layernorm",
                head="linear",
                loss="smooth_l1",
                loss_beta=2.0,
                color_jitter="none",
            ),
            "MaskDistill: block masking 40 %, regress a frozen teacher's LayerNorm-ed features",
        ),
        # SimMIM (Xie et al., 2022): random masking 60 %, mask tokens, a linear head to raw pixels
        # (normalised-image units, no per-patch norm), l1 on the masked pixels. SimMIM masks 32 px
        # squares (groups of 16 px patches); here every patch is masked independently.
        Preset(
            "simmim",
            "masked",
            dict(_SIMMIM),
            "SimMIM: random 60 % with mask tokens, linear head, l1 on raw pixels",
        ),
        # SimMIM's masking-strategy ablation (Xie et al., 2022, Table 1) includes BEiT's block-wise
        # masking: the simmim preset with method.mask=block.
        Preset(
            "simmim_block",
            "masked",
            dict(_SIMMIM, mask="block"),
            "SimMIM with block-wise (BEiT) masking at 60 %",
        ),
        # MaskFeat (Wei et al., 2022): block masking 40 %, mask tokens, HOG of every patch (9 bins,
        # 2 x 2 cells, already l2-normalised per patch), linear head, l2.
        Preset(
            "maskfeat",
            "masked",
            dict(
                mask="block",
                mask_ratio=0.4,
                view2="none",
                student="mask_token",
                target="hog",
                target_norm="none",
                head="linear",
                loss="l2",
                color_jitter="none",
            ),
            "MaskFeat: block masking 40 %, regress the HOG of the masked patches",
        ),
        # data2vec (Baevski et al., 2022), vision: block masking 60 %, mask tokens, EMA of the
        # student on the full image, mean of its top-6 block outputs each instance-normalised over
        # the tokens (inside the target), linear head, smooth-l1 with beta 2 (fairseq's data2vec
        # vision config); EMA momentum constant 0.999 (data2vec anneals 0.999 -> 0.9998).
        Preset(
            "data2vec",
            "masked",
            dict(
                mask="block",
                mask_ratio=0.6,
                view2="none",
                student="mask_token",
                target="ema",
                ema_top_k=6,
                ema_momentum=0.999,
                target_norm="none",
                head="linear",
                loss="smooth_l1",
                loss_beta=2.0,
                color_jitter="none",
            ),
            "data2vec: block masking 60 %, regress the EMA teacher's top-6 block average",
        ),
    )
}

#: ``method.name`` -> field values (the presets' values as plain dicts)
METHOD_PRESETS: dict[str, dict[str, Any]] = {n: dict(p.values) for n, p in PRESETS.items()}


def presets_of(family: str) -> list[str]:
    return [n for n, p in PRESETS.items() if p.family == family]


def reading_families(field_name: str) -> list[str]:
    """The families whose builders read ``method.<field_name>``."""
    return [f.name for f in FAMILIES.values() if field_name in f.reads]


# --------------------------------------------------------------------------------------
# Resolution-time checks
# --------------------------------------------------------------------------------------
def method_aliases(section: dict) -> dict:
    """Input aliases of the method section (a copy; the dict is not changed in place).

    ``norm_pix_loss`` (MAE's name) is read as ``target_norm`` = patch (true) | none (false)
    when ``target_norm`` is not given; next to an explicit ``target_norm`` (as in configs saved
    before the alias, which wrote both) the alias is dropped and ``target_norm`` decides."""
    if "norm_pix_loss" not in section:
        return section
    out = dict(section)
    npl = out.pop("norm_pix_loss")
    if "target_norm" not in out:
        if not isinstance(npl, bool):
            raise ConfigError(f"method.norm_pix_loss: expected true | false, got {npl!r}")
        out["target_norm"] = "patch" if npl else "none"
    return out


def check_unread(m: Any, explicit: Mapping[str, Any]) -> None:
    """A field the user set that the method's family never reads is an error (unless it keeps
    its default value, as every field of a full config dump does)."""
    fam = family_of(m)
    defaults = {
        f.name: f.default for f in dataclasses.fields(m) if f.default is not dataclasses.MISSING
    }
    for key in explicit:
        if key in fam.reads or key not in defaults or getattr(m, key) == defaults[key]:
            continue
        close = difflib.get_close_matches(key, sorted(fam.reads), n=1, cutoff=0.75)
        hint = f"did you mean 'method.{close[0]}'? " if close else ""
        readers = []
        for f in reading_families(key):
            names = presets_of(f)
            readers.append(
                f"{FAMILIES[f].title} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
        raise ConfigError(
            f"method.{key} is not read by the {fam.title} family that method "
            f"'{m.name}' belongs to; {hint}it is read by {' and '.join(readers)}"
        )


def check_method(m: Any, explicit: Optional[Mapping[str, Any]] = None) -> Family:
    """Every check of a method config, in one place: the fields every family reads, the
    family's own checks, and (given the user's ``explicit`` method section) fields the family
    does not read. Returns the family."""
    _check_common(m)
    fam = family_of(m)
    if explicit:
        check_unread(m, explicit)
    fam.check(m)
    return fam
