"""Tests for mimlab.nn.teachers: frozen teachers producing per-patch targets on the student grid."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mimlab.methods  # noqa: F401  (registers the model-source teacher kinds)
from mimlab.nn.teachers import (
    TEACHER_BUILDERS,
    TEACHER_SPECS,
    EfficientNetLite0Teacher,
    HFCLIPTeacher,
    HOGTeacher,
    OpenCLIPTeacher,
    Teacher,
    TimmTeacher,
    TorchvisionTeacher,
    build_teacher,
    gaussian_window,
    resample_to_grid,
)

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
NORM = dict(student_mean=MEAN, student_std=STD)


def normalise(pixels, mean=MEAN, std=STD):
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def images(b=2, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return normalise(
        torch.rand(b, c, h, w, generator=g),
        MEAN[:c] if c == 3 else [0.5],
        STD[:c] if c == 3 else [0.25],
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # small ops with 2 intra-op threads on a busy 2-core machine are ~100x slower (thread sync)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def effnet(_one_thread):
    return EfficientNetLite0Teacher(**NORM, teacher_size=64)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised")
        yield


# ---------------------------------------------------------------------------------- resampling
def test_resample_to_grid_down_up_and_identity():
    f = torch.randn(2, 5, 8, 8)
    assert torch.equal(resample_to_grid(f, (8, 8)), f)
    down = resample_to_grid(f, (4, 4))
    assert torch.allclose(down, F.avg_pool2d(f, 2))
    up = resample_to_grid(f, (16, 16))
    assert torch.allclose(up, F.interpolate(f, size=(16, 16), mode="bilinear", align_corners=False))
    assert resample_to_grid(f, (16, 4)).shape == (2, 5, 16, 4)


# ---------------------------------------------------------------------------------- frozen
def test_teacher_is_frozen_and_stays_in_eval(effnet):
    assert isinstance(effnet, Teacher)
    assert all(not p.requires_grad for p in effnet.parameters())
    effnet.train()
    assert not effnet.training and not any(m.training for m in effnet.modules())
    before = {k: v.clone() for k, v in effnet.state_dict().items()}

    torch.manual_seed(0)
    x, grid, p = images(), (4, 4), 8
    student = torch.nn.Linear(3 * p * p, effnet.out_dim)
    opt = torch.optim.SGD(list(student.parameters()) + list(effnet.parameters()), lr=0.1)
    patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, 16, 3*p*p)
    target = effnet(x, grid)
    assert not target.requires_grad
    w0 = student.weight.clone()
    F.mse_loss(student(patches), target).backward()
    opt.step()
    assert not torch.equal(student.weight, w0)  # the student learned ...
    after = effnet.state_dict()  # ... the teacher (weights and BN statistics) did not
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in effnet.parameters())


# ---------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("size,patch", [(32, 4), (32, 8), (64, 16), (224, 16), ((32, 64), 8)])
def test_hog_grid(size, patch):
    h, w = (size, size) if isinstance(size, int) else size
    t = HOGTeacher(**NORM)
    out = t(images(2, 3, h, w), (h // patch, w // patch))
    assert out.shape == (2, (h // patch) * (w // patch), t.out_dim) and t.out_dim == 3 * 9 * 4


@pytest.mark.parametrize(
    "size,patch,layer",
    [(32, 4, "head"), (32, 8, "blocks"), (64, 16, "head"), (224, 16, "head"), (32, 4, 3)],
)
def test_effnet_grid(effnet, size, patch, layer):
    t = effnet if layer == "head" else EfficientNetLite0Teacher(layer, **NORM, teacher_size=64)
    g = size // patch
    out = t(images(2, 3, size, size), (g, g))
    assert out.shape == (2, g * g, t.out_dim)
    assert t.out_dim == {"head": 1280, "blocks": 320, 3: 40}[layer]


# ---------------------------------------------------------------------------------- effnet
def test_effnet_offline_deterministic_and_informative(effnet):
    x = images()
    a, b = effnet(x, (4, 4)), effnet(x, (4, 4))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert a.abs().sum() > 0 and a.std(dim=1).mean() > 1e-3  # not zero, varies across tokens
    assert not torch.allclose(a, effnet(images(seed=1), (4, 4)))


def test_effnet_imagenet_weights_recognise_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    t = EfficientNetLite0Teacher(**NORM, teacher_size=160)
    with torch.no_grad():
        logits = t.net(t.preprocess(normalise(img)))  # full classifier on the teacher's input
    assert logits.argmax().item() in range(281, 286)  # ImageNet domestic-cat classes


def test_one_channel_student_matches_replicated_rgb(effnet):
    gray = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    t1 = EfficientNetLite0Teacher(student_mean=[0.5], student_std=[0.25], teacher_size=64)
    out1 = t1(normalise(gray, [0.5], [0.25]), (4, 4))
    out3 = effnet(normalise(gray.expand(-1, 3, -1, -1)), (4, 4))
    assert out1.shape == (2, 16, 1280) and torch.allclose(out1, out3, atol=1e-4, rtol=1e-4)
    hog = HOGTeacher(student_mean=[0.5], student_std=[0.25])
    assert hog(normalise(gray, [0.5], [0.25]), (4, 4)).shape == (2, 16, 36) and hog.out_dim == 36


# ---------------------------------------------------------------------------------- HOG
def _hog_pixels(kind):
    x = torch.zeros(1, 3, 32, 32)
    if kind == "vertical":
        x[..., :, 16:] = 1.0  # edge along a column: horizontal gradient
    elif kind == "horizontal":
        x[..., 16:, :] = 1.0
    else:
        x += 0.3
    return x


def test_hog_constant_image_is_zero():
    t = HOGTeacher(**NORM)
    assert t(normalise(_hog_pixels("constant")), (4, 4)).abs().max() < 1e-6
    assert list(t.parameters()) == []


@pytest.mark.parametrize(
    "mode,kind,bin_",
    [
        ("legacy", "vertical", 0),
        ("legacy", "horizontal", 4),
        ("maskfeat", "vertical", 4),
        ("maskfeat", "horizontal", 0),
    ],
)
def test_hog_edge_orientation_bin(mode, kind, bin_):
    t = HOGTeacher(nbins=9, cells_per_side=2, mode=mode, **NORM)
    out = t(normalise(_hog_pixels(kind)), (4, 4))  # (1, 16, 3*9*4)
    cells = out.reshape(1, 16, 3, 9, 4)  # (channel, bin, cell)
    hist = cells.sum(dim=(2, 4))[0]  # (tokens, bins)
    on_edge = hist.sum(1) > 0
    assert on_edge.sum() == 8  # the 3x3 Sobel support reaches the patches on both sides
    assert (hist[on_edge].argmax(1) == bin_).all()
    assert out[0, ~on_edge].abs().max() == 0
    if mode == "legacy":  # the token is l2-normalised
        assert torch.allclose(out[0, on_edge].norm(dim=-1), torch.ones(8), atol=1e-5)
    else:  # each cell's histogram is l2-normalised per channel (norm 1, or 0 without gradient)
        n = cells[0].norm(dim=2)  # (tokens, channels, cells)
        assert ((n - 1).abs() < 1e-5).logical_or(n == 0).all() and (n > 0).sum() == 8 * 3 * 2


def test_hog_grayscale_option():
    t = HOGTeacher(grayscale=True, **NORM)
    assert t.out_dim == 36 and t(images(), (8, 8)).shape == (2, 64, 36)


def test_hog_maskfeat_hand_computed_example():
    """MaskFeat reference HOG on one 4x4 grey patch (1 channel, cells of 2 px, Gaussian window
    4 px, sigma 2), a single white pixel in the bottom-left corner, by hand:

    reflect padding mirrors row 2 / column 1 (both black) into the pad, so the pixel itself has
    no gradient; gx = left minus right and gy = top minus bottom Sobel responses are non-zero at
      (2,1): gx=1, gy=-1 -> |g|=sqrt(2), floor(atan2(1,-1)/pi*9) = floor(6.75) -> bin 6
      (3,1): gx=2, gy=0  -> |g|=2,       floor(atan2(2, 0)/pi*9) = floor(4.5)  -> bin 4
      (2,0): gx=0, gy=-2 -> |g|=2,       atan2(0,-2) = pi -> 9 mod 9            -> bin 0
    all inside cell (row 1, col 0). 1-D window weights: w0 = w3 = a = exp(-(1.5/2)^2/2),
    w1 = w2 = b = exp(-(0.5/2)^2/2); the cell sums are 2ab (bin 0), sqrt(2) b^2 (bin 6), 2ab
    (bin 4), over the window total (2a + 2b)^2, then l2-normalised over the 9 bins."""
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 3, 0] = 1.0
    t = HOGTeacher(student_mean=[0.0], student_std=[1.0], mode="maskfeat")
    a, b = math.exp(-0.5 * 0.75**2), math.exp(-0.5 * 0.25**2)
    raw = t.cell_histograms(x, (1, 1))  # (1, 1, 9, 2, 2)
    want_raw = torch.zeros(9, 2, 2)
    s = (2 * a + 2 * b) ** 2
    want_raw[0, 1, 0], want_raw[6, 1, 0], want_raw[4, 1, 0] = (
        2 * a * b / s,
        2**0.5 * b * b / s,
        2 * a * b / s,
    )
    assert torch.allclose(raw[0, 0], want_raw, atol=1e-6)
    out = t(x, (1, 1))  # (1, 1, 36): index = bin * 4 + cell_row * 2 + cell_col
    z = math.sqrt(8 * a * a + 2 * b * b)
    want = torch.zeros(36)
    want[0 * 4 + 2], want[4 * 4 + 2], want[6 * 4 + 2] = 2 * a / z, 2 * a / z, 2**0.5 * b / z
    assert out.shape == (1, 1, 36)
    assert torch.allclose(out[0, 0], want, atol=1e-6)
    assert want[2] == pytest.approx(0.59503, abs=1e-5) and want[26] == pytest.approx(
        0.54025, abs=1e-5
    )
    # the earlier mimlab HOG (replicate padding, no window, one norm per token) differs
    legacy = HOGTeacher(student_mean=[0.0], student_std=[1.0], mode="legacy")(x, (1, 1))
    assert not torch.allclose(legacy, out, atol=1e-2)


def test_gaussian_window_and_mirror_symmetry():
    w = gaussian_window((4, 4))
    e = torch.exp(torch.tensor([-0.28125, -0.03125, -0.03125, -0.28125]))
    assert torch.allclose(w, torch.outer(e, e) / torch.outer(e, e).sum())
    assert gaussian_window((16, 16)).argmax() in (7 * 16 + 7, 7 * 16 + 8, 8 * 16 + 7, 8 * 16 + 8)
    # mirroring the image left-right negates gx, so bin i becomes bin (-1 - i) mod 9 (except
    # exactly on a bin boundary: gx = 0 in the first and last columns, reflect padding)
    t = HOGTeacher(**NORM)
    x = images(1)
    a = t.cell_histograms(x, (4, 4))[..., 1:-1]  # (1, 3, 9, 8, 6): inner cell columns
    b = t.cell_histograms(x.flip(-1), (4, 4)).flip(-1)[..., 1:-1]
    assert torch.allclose(a, b[:, :, [(-1 - i) % 9 for i in range(9)]], atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-3)


def test_hog_maskfeat_ignores_the_student_normalisation():
    """Per-channel affine normalisation only scales each channel's gradients; each cell is
    normalised per channel, so the target does not depend on the student mean/std."""
    pix = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    a = HOGTeacher(**NORM)(normalise(pix), (4, 4))
    b = HOGTeacher(student_mean=[0.0] * 3, student_std=[1.0] * 3)(pix, (4, 4))
    assert torch.allclose(a, b, atol=1e-5)


def test_hog_modes_specs_and_errors():
    assert build_teacher("hog", MEAN, STD).mode == "maskfeat"
    assert build_teacher("hog:maskfeat", MEAN, STD).mode == "maskfeat"
    assert build_teacher("hog:legacy", MEAN, STD).mode == "legacy"
    with pytest.raises(ValueError, match="maskfeat\\|legacy"):
        build_teacher("hog:fancy", MEAN, STD)
    with pytest.raises(ValueError, match="unknown mode 'fancy'"):
        HOGTeacher(mode="fancy", **NORM)
    with pytest.raises(ValueError, match="multiples of 2 cells"):
        HOGTeacher(**NORM)(images(1, 3, 9, 9), (3, 3))  # 3 px patches: no 2 x 2 cells
    with pytest.raises(ValueError, match="does not tile"):
        HOGTeacher(window=5, **NORM)(images(1), (4, 4))
    # the settings are part of the teacher's state (so the teacher cache key tells them apart)
    sd = [HOGTeacher(mode=m, **NORM).state_dict()["settings"] for m in ("maskfeat", "legacy")]
    assert not torch.equal(*sd)


# ---------------------------------------------------------------------------------- CLIP
def _tiny_open_clip():
    import open_clip

    cfg = dict(
        embed_dim=48,
        vision_cfg=dict(
            image_size=32, patch_size=8, width=64, layers=2, head_width=32, mlp_ratio=2.0
        ),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )
    return cfg, open_clip.CLIP(**cfg).eval()


def test_open_clip_checkpoint_round_trip(tmp_path):
    import open_clip

    torch.manual_seed(0)
    cfg, model = _tiny_open_clip()
    (tmp_path / "mimlab-test-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "mimlab-test-tiny-clip.json")
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)

    loaded = build_teacher(f"open_clip:mimlab-test-tiny-clip@{ckpt}", MEAN, STD)
    in_mem = OpenCLIPTeacher(model=model, **NORM)
    assert isinstance(loaded, OpenCLIPTeacher) and loaded.out_dim == 48
    x = images()
    out = loaded(x, (4, 4))
    assert out.shape == (2, 16, 48) and torch.allclose(out, in_mem(x, (4, 4)), atol=1e-6)
    # independent reference: open_clip's own token output (after ln_post) times visual.proj
    model.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = model.visual(in_mem.preprocess(x))
    model.visual.output_tokens = False
    assert torch.allclose(out, tokens @ model.visual.proj, atol=1e-5)
    # other token choices and a differently initialised model
    assert OpenCLIPTeacher(model=model, tokens="ln_post", **NORM)(x, (4, 4)).shape == (2, 16, 64)
    assert torch.allclose(
        OpenCLIPTeacher(model=model, tokens="ln_post", **NORM)(x, (4, 4)), tokens, atol=1e-5
    )
    assert OpenCLIPTeacher(model=model, tokens="raw", layer=0, **NORM).out_dim == 64
    _, other = _tiny_open_clip()
    assert not torch.allclose(out, OpenCLIPTeacher(model=other, **NORM)(x, (4, 4)))


def test_hf_clip_round_trip(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    model = CLIPVisionModel(cfg).eval()
    model.save_pretrained(tmp_path)
    t = build_teacher(f"hf_clip:{tmp_path}", MEAN, STD)
    assert isinstance(t, HFCLIPTeacher) and t.out_dim == 32
    x = images()
    with torch.no_grad():
        ref = model(pixel_values=t.preprocess(x)).last_hidden_state[:, 1:]
    assert torch.allclose(t(x, (4, 4)), ref, atol=1e-5)
    assert t(x, (2, 2)).shape == (2, 4, 32) and t(x, (8, 8)).shape == (2, 64, 32)


# ---------------------------------------------------------------------------------- timm / tv
def test_timm_checkpoint_round_trip(tmp_path):
    import timm

    torch.manual_seed(0)
    cnn = timm.create_model("resnet10t").eval()
    torch.save({"state_dict": cnn.state_dict()}, tmp_path / "r10t.pth")
    t = TimmTeacher("resnet10t", tmp_path / "r10t.pth", **NORM, teacher_size=64)
    x = images()
    with torch.no_grad():
        ref = resample_to_grid(cnn.forward_features(t.preprocess(x)), (4, 4))
    ref = ref.flatten(2).transpose(1, 2)
    assert t.out_dim == 512 and torch.allclose(t(x, (4, 4)), ref, atol=1e-5)

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    from safetensors.torch import save_file

    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    tv = build_teacher(
        f"timm:vit_tiny_patch16_224@{tmp_path / 'vit.safetensors'}",
        MEAN,
        STD,
        img_size=32,
        patch_size=8,
    )
    with torch.no_grad():
        ref = vit.forward_features(tv.preprocess(x))[:, 1:]
    assert tv.teacher_size == (32, 32) and torch.allclose(tv(x, (4, 4)), ref, atol=1e-5)

    with pytest.raises(RuntimeError, match="does not match"):
        TimmTeacher("resnet10t", tmp_path / "vit.safetensors", **NORM)


def test_torchvision_weights_round_trip(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    t = build_teacher(f"torchvision:resnet18@{tmp_path / 'r18.pth'}", MEAN, STD, teacher_size=64)
    x = images()
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    with torch.no_grad():
        ref = resample_to_grid(trunk(t.preprocess(x)), (4, 4)).flatten(2).transpose(1, 2)
    assert t.out_dim == 512 and torch.allclose(t(x, (4, 4)), ref, atol=1e-5)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make",
    [
        lambda p: TimmTeacher("resnet10t", p, **NORM),
        lambda p: TorchvisionTeacher("resnet18", p, **NORM),
        lambda p: OpenCLIPTeacher("ViT-B-16", p, **NORM),
        lambda p: HFCLIPTeacher(p, **NORM),
        lambda p: EfficientNetLite0Teacher(weights_path=p, **NORM),
        lambda p: build_teacher(f"open_clip:ViT-B-16@{p}", MEAN, STD),
    ],
)
def test_missing_checkpoint_is_a_clear_error(tmp_path, make):
    missing = str(tmp_path / "nope" / "weights.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        make(missing)


def test_bad_specs():
    with pytest.raises(ValueError, match="valid forms"):
        build_teacher("dino_v9", MEAN, STD)
    with pytest.raises(ValueError, match="valid forms"):
        build_teacher("open_clip:ViT-B-16", MEAN, STD)  # no checkpoint
    with pytest.raises(ValueError, match="checkpoint"):
        OpenCLIPTeacher("ViT-B-16", **NORM)
    with pytest.raises(RuntimeError, match="hf_clip:/path/to/dir"):  # hub id, nothing cached
        HFCLIPTeacher("openai/clip-vit-base-patch16", local_files_only=True, **NORM)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_teacher("timm:not_a_model", MEAN, STD)
    with pytest.raises(ValueError, match="layer"):
        EfficientNetLite0Teacher("middle", **NORM)
    with pytest.raises(ValueError, match="student_mean"):
        HOGTeacher(**NORM)(images(c=1), (4, 4))  # channel count differs from the statistics


def test_build_teacher_specs():
    t = build_teacher("effnet_lite0:blocks", MEAN, STD, teacher_size=64)
    assert isinstance(t, EfficientNetLite0Teacher) and t.out_dim == 320
    assert isinstance(build_teacher("hog", MEAN, STD, cells_per_side=1), HOGTeacher)
    t = build_teacher("timm:resnet10t", MEAN, STD, teacher_size=64)
    assert t(images(), (2, 2)).shape == (2, 4, 512)


# ---------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("kind", sorted(TEACHER_BUILDERS))
def test_every_registered_teacher_kind_is_documented_and_refuses_an_empty_spec(kind, tmp_path):
    """Parametrised over the teacher registry: each kind is named in TEACHER_SPECS (what the
    error and --help show), and a spec it cannot use fails in one line listing the forms."""
    assert any(
        kind in form or kind.replace("efficientnet", "effnet") in form for form in TEACHER_SPECS
    )
    if kind in ("effnet_lite0", "efficientnet_lite0"):  # complete without an argument
        spec = f"{kind}@{tmp_path / 'missing.pth'}"
        with pytest.raises((FileNotFoundError, RuntimeError, ValueError)):
            build_teacher(spec, MEAN, STD)
        return
    with pytest.raises(ValueError, match="unknown teacher spec") as e:
        build_teacher(f"{kind}@{tmp_path}/x" if kind == "hog" else kind, MEAN, STD)
    assert "\n" not in str(e.value) and "valid forms" in str(e.value)


def test_unknown_teacher_kind_lists_the_forms():
    with pytest.raises(ValueError, match="unknown teacher spec 'nope:x'; valid forms: effnet"):
        build_teacher("nope:x", MEAN, STD)
