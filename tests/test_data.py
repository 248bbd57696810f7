"""mimlab.data.datasets: every source kind by path, deterministic augmentation and sampling,
subsets, statistics, and robustness to bad data (generated fixtures; see docs/reliability.md)."""

from __future__ import annotations

import gzip
import io
import logging
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from mimlab.core.config import DataConfig
from mimlab.data.datasets import (
    KNOWN_STATS,
    BadImageError,
    DataError,
    EpochSampler,
    ImageDataset,
    Source,
    balanced_fraction,
    build_dataset,
    compute_mean_std,
    default_data_path,
    detect_kind,
    load_image,
    resolve_stats,
    scan_source,
    subset_indices,
    train_transform,
)


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def _build(
    path, img_size=16, in_chans=3, split="train", train_aug=True, labelled=False, seed=0, **kw
):
    return build_dataset(
        _cfg(path, **kw), split, img_size, in_chans, seed, train_aug=train_aug, labelled=labelled
    )


def _save_const(path: Path, colour, size=(20, 20), mode="RGB"):
    Image.new(mode, size, colour).save(path)


# ------------------------------------------------------------------------ bad-data fixture
GOOD_UNUSUAL = (
    "gray.png",
    "rgba.png",
    "pal.png",
    "pal_transparent.png",
    "g16.png",
    "cmyk.jpg",
    "tiny1.png",
    "tiny35.png",
)
UNREADABLE = ("corrupt.jpg", "trunc.jpg", "trunc.png", "empty.jpg", "text.png", "bomb.png")


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height (with a valid CRC): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    return bytes(b)


def make_bad_folder(root: Path) -> Path:
    """A plain folder mixing good, good-but-unusual and unreadable files (see GOOD_UNUSUAL,
    UNREADABLE), plus an empty sub-folder, a nested image and a non-image file."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            root / f"good{k}.png"
        )
    # unreadable
    (root / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    real = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for ext, fmt in ((".jpg", "JPEG"), (".png", "PNG")):
        buf = io.BytesIO()
        real.save(buf, format=fmt)
        data = buf.getvalue()
        (root / f"trunc{ext}").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    (root / "bomb.png").write_bytes(_png_with_size(20000, 20000))
    # good but unusual
    _save_const(root / "gray.png", 77, mode="L")
    _save_const(root / "rgba.png", (10, 20, 30, 128), mode="RGBA")
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(root / "pal.png")
    pal.save(root / "pal_transparent.png", transparency=1)
    g16 = np.zeros((6, 6), np.uint16)
    g16[0, 0], g16[0, 1], g16[0, 2], g16[0, 3] = 65535, 32896, 1000, 257
    Image.fromarray(g16).save(root / "g16.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    _save_const(root / "tiny1.png", (200, 100, 50), size=(1, 1))
    _save_const(root / "tiny35.png", (1, 2, 3), size=(3, 5))
    # structure
    (root / "empty_dir").mkdir()
    (root / "sub").mkdir()
    _save_const(root / "sub" / "nested.png", (9, 9, 9))
    (root / "readme.txt").write_text("not an image extension: ignored\n")
    return root


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    return make_bad_folder(tmp_path / "bad")


def _expected_skips(names: list[str]) -> list[int]:
    """n_skipped of each index when unreadable files are replaced by the next readable one."""
    bad = [n in UNREADABLE for n in names]
    out = []
    for i in range(len(names)):
        k = 0
        while bad[(i + k) % len(names)]:
            k += 1
        out.append(k)
    return out


def test_bad_fixture_has_expected_pil_modes(bad_folder):
    modes = {
        n: Image.open(bad_folder / n).mode
        for n in ("gray.png", "rgba.png", "pal.png", "g16.png", "cmyk.jpg")
    }
    assert modes == {
        "gray.png": "L",
        "rgba.png": "RGBA",
        "pal.png": "P",
        "g16.png": "I;16",
        "cmyk.jpg": "CMYK",
    }


# ------------------------------------------------------------------------ unusual images
@pytest.mark.parametrize("in_chans", [1, 3, 4])
def test_unusual_images_load_with_sensible_values(bad_folder, in_chans):
    def px(name, y=0, x=0):
        t = load_image(bad_folder / name, in_chans)
        assert t.dtype == torch.uint8 and t.shape[0] == in_chans
        return t[:, y, x].tolist()

    alpha = [255] if in_chans == 4 else []
    rgb = (lambda r, g, b: [r, g, b] + alpha) if in_chans != 1 else (lambda r, g, b: None)
    if in_chans == 1:
        assert px("gray.png") == [77]
        assert px("rgba.png") == [18]  # luminance of (10, 20, 30); alpha dropped
        assert px("pal.png") == [76] and px("pal.png", 1, 1) == [150]  # L of red / green
    else:
        assert px("gray.png") == rgb(77, 77, 77)
        assert px("rgba.png") == ([10, 20, 30, 128] if in_chans == 4 else [10, 20, 30])
        assert px("pal.png") == rgb(255, 0, 0) and px("pal.png", 1, 1) == rgb(0, 255, 0)
        # palette index 1 is transparent: RGB keeps its colour, RGBA gets alpha 0
        t = load_image(bad_folder / "pal_transparent.png", in_chans)
        assert t[:3, 1, 1].tolist() == [0, 255, 0]
        if in_chans == 4:
            assert t[3, 1, 1] == 0 and t[3, 0, 0] == 255
        cmyk = load_image(bad_folder / "cmyk.jpg", in_chans)
        assert cmyk.shape == (in_chans, 16, 16)
        r, g, b = cmyk[:3].float().mean((1, 2)).tolist()  # CMYK (0,255,255,0) is red
        assert r > 235 and g < 20 and b < 20
    # 16-bit: scaled by 65535 -> 255, not clipped (1000 would otherwise become 255)
    g16 = load_image(bad_folder / "g16.png", in_chans)
    assert g16.shape == (in_chans, 6, 6)
    assert g16[0, 0, :5].tolist() == [255, 128, 4, 1, 0]
    assert (g16[: min(in_chans, 3)] == g16[:1]).all()
    if in_chans == 4:
        assert (g16[3] == 255).all()
    # images smaller than the crop
    assert load_image(bad_folder / "tiny1.png", in_chans).shape == (in_chans, 1, 1)
    assert load_image(bad_folder / "tiny35.png", in_chans).shape == (in_chans, 5, 3)
    tf = train_transform(16, [0.5] * in_chans, [0.5] * in_chans)
    for name in GOOD_UNUSUAL:
        x = tf(load_image(bad_folder / name, in_chans))
        assert x.shape == (in_chans, 16, 16) and torch.isfinite(x).all(), name


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_files_raise_bad_image_error_naming_them(bad_folder, name):
    with pytest.raises(BadImageError, match=name.replace(".", r"\.")):
        load_image(bad_folder / name, 3)


def test_missing_file_is_a_bad_image(tmp_path):
    with pytest.raises(BadImageError, match="gone.jpg"):
        load_image(tmp_path / "gone.jpg", 3)


def test_truncated_images_are_not_loaded_partly_grey(bad_folder):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name in ("trunc.jpg", "trunc.png"):
        with pytest.raises(BadImageError, match="truncated"):
            load_image(bad_folder / name, 3)
    _build(bad_folder)[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global PIL state untouched


def test_image_files_cannot_make_other_channel_counts(bad_folder):
    with pytest.raises(BadImageError, match=r"\.npy"):
        load_image(bad_folder / "good0.png", 5)


# ------------------------------------------------------------------------ bad data in a dataset
def test_folder_lists_images_recursively_and_ignores_other_files(bad_folder):
    src = scan_source(_cfg(bad_folder), "train", labelled=False)
    names = [p.name for p in src.items]
    assert "nested.png" in names and "readme.txt" not in names
    assert len(names) == 4 + len(GOOD_UNUSUAL) + len(UNREADABLE) + 1
    assert src.labels == [-1] * len(names) and src.kind == "folder"


def test_skip_mode_replaces_and_counts_bad_files(bad_folder):
    ds = _build(bad_folder)  # on_bad='skip' is the default
    names = [p.name for p in ds.src.items]
    want = _expected_skips(names)
    got = []
    for i in range(len(ds)):
        x, y, _, k = ds[i]
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all() and y == -1
        got.append(k)
    assert got == want and sum(got) >= len(UNREADABLE)


def test_skip_mode_warns_once_per_file(bad_folder, caplog):
    ds = _build(bad_folder)
    i = [p.name for p in ds.src.items].index("corrupt.jpg")
    with caplog.at_level(logging.WARNING, logger="mimlab.data"):
        ds[i], ds[(i, 1)]
    assert sum("corrupt.jpg" in r.getMessage() for r in caplog.records) == 1


def test_error_mode_names_the_file_and_the_fix(bad_folder):
    ds = _build(bad_folder, on_bad="error")
    for i, p in enumerate(ds.src.items):
        if p.name in UNREADABLE:
            with pytest.raises(BadImageError) as ei:
                ds[i]
            assert p.name in str(ei.value) and "data.on_bad=skip" in str(ei.value)
        else:
            assert ds[i][0].shape == (3, 16, 16)


def test_all_unreadable_folder_is_a_data_error_not_a_hang(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    for k in range(5):
        (root / f"x{k}.jpg").write_bytes(b"garbage" * k)
    ds = _build(root)
    with pytest.raises(DataError, match="all 5 files") as ei:
        ds[2]
    assert not isinstance(ei.value, BadImageError) and "x2.jpg" in str(ei.value)


def test_long_run_of_bad_files_is_bounded(tmp_path):
    root = tmp_path / "mostly_bad"
    root.mkdir()
    for k in range(6):
        (root / f"b{k}.jpg").write_bytes(b"")
    _save_const(root / "z_good.png", (1, 2, 3))
    ds = _build(root)
    assert ds[0].skipped == 6  # found the good one after 6 bad files
    ds.max_bad_run = 3
    with pytest.raises(DataError, match="3 consecutive"):
        ds[0]


def _first_error(loader) -> tuple[type, str]:
    """Iterate ``loader`` to its first exception; return its class and message.

    After a worker error (torch 2.x) the iterator is left in a reference cycle; when the
    garbage collector frees it, its worker shutdown waits 2 x 5 s for workers that never get
    the stop signal, so shut the workers down explicitly here."""
    it = iter(loader)
    try:
        for _ in it:
            pass
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    finally:
        getattr(it, "_shutdown_workers", lambda: None)()
    raise AssertionError("no exception raised")


def test_dataloader_workers_reraise_bad_image_error(bad_folder):
    ds = _build(bad_folder, on_bad="error")
    cls, msg = _first_error(DataLoader(ds, batch_size=4, num_workers=2))
    assert cls is BadImageError  # same class in the main process: its constructor takes a str
    assert "DataLoader worker" in msg and "data.on_bad=skip" in msg
    assert any(n in msg for n in UNREADABLE)


def test_dataloader_workers_reraise_data_error(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "a.png").write_text("nope")
    cls, msg = _first_error(DataLoader(_build(root), batch_size=1, num_workers=2))
    assert cls is DataError and "unreadable" in msg and "a.png" in msg


def test_dataloader_workers_skip_counts(bad_folder):
    ds = _build(bad_folder)
    want = sum(_expected_skips([p.name for p in ds.src.items]))
    total, seen = 0, 0
    for x, y, _, k in DataLoader(ds, batch_size=5, num_workers=2):
        assert x.shape[1:] == (3, 16, 16) and torch.isfinite(x).all()
        total += int(k.sum())
        seen += len(x)
    assert seen == len(ds) and total == want


def test_invalid_on_bad_is_rejected(tiny_folder):
    src = scan_source(_cfg(tiny_folder), "train", labelled=True)
    with pytest.raises(DataError, match="on_bad"):
        ImageDataset(src, None, 3, on_bad="ignore")


# ------------------------------------------------------------------------ bad folders / paths
def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist.*nowhere"):
        scan_source(_cfg(tmp_path / "nowhere"), "train", labelled=False)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "x.png"
    _save_const(f, (1, 1, 1))
    with pytest.raises(DataError, match="not a folder"):
        scan_source(_cfg(f), "train", labelled=False)


@pytest.mark.parametrize("labelled", [False, True])
def test_empty_directory(tmp_path, labelled):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError, match="no images found") as ei:
        scan_source(_cfg(root), "train", labelled=labelled)
    assert str(root) in str(ei.value)


def test_only_empty_subfolders(tmp_path):
    root = tmp_path / "hollow"
    (root / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="without images: a"):
        scan_source(_cfg(root), "train", labelled=True)
    with pytest.raises(DataError, match="no images found"):
        scan_source(_cfg(root), "train", labelled=False)


def test_class_folder_without_images(tmp_path, caplog):
    root = make_imagefolder_with_empty_class(tmp_path)
    with pytest.raises(DataError, match=r"without images: class_empty.*add images or remove"):
        scan_source(_cfg(root), "train", labelled=True)
    with caplog.at_level(logging.WARNING, logger="mimlab.data"):
        src = scan_source(_cfg(root), "train", labelled=False)  # pretraining: warn, go on
    assert len(src.items) == 4 and "without images" in caplog.text


def make_imagefolder_with_empty_class(tmp_path: Path) -> Path:
    root = tmp_path / "ifold"
    for c in ("class_a", "class_b"):
        (root / "train" / c).mkdir(parents=True)
        for k in range(2):
            _save_const(root / "train" / c / f"{k}.png", (k, 0, 0))
    (root / "train" / "class_empty").mkdir()
    (root / "train" / "class_empty" / "notes.txt").write_text("no images here")
    return root


def test_missing_val_split(tmp_path):
    root = tmp_path / "only_train"
    make_imagefolder_with_empty_class(tmp_path)  # has train/ only
    (tmp_path / "ifold").rename(root)
    with pytest.raises(DataError, match="no 'test' sub-folder"):
        scan_source(_cfg(root), "val", labelled=False)


# ------------------------------------------------------------------------ sources by path
def test_imagefolder_labelled(tiny_folder):
    ds = _build(tiny_folder, labelled=True)
    assert ds.classes == ["class0", "class1", "class2"] and len(ds) == 24
    assert sorted(set(ds.labels)) == [0, 1, 2]
    x, y, _, k = ds[9]
    assert x.shape == (3, 16, 16) and y == 1 and k == 0
    val = _build(tiny_folder, split="val", train_aug=False, labelled=True)
    assert len(val) == 24 and val[0][0].shape == (3, 16, 16)


def test_cifar10(cifar_dir):
    ds = _build(cifar_dir, img_size=32, labelled=True)
    assert len(ds.classes) == 10 and len(ds) >= 300
    x, y, _, _ = ds[len(ds) - 1]
    assert x.shape == (3, 32, 32) and y == 9
    val = _build(cifar_dir, img_size=32, split="val", train_aug=False, labelled=True, val_limit=20)
    assert len(val) == 20 and len(set(val.labels)) == 10  # class-balanced val subset
    if "cifar" in str(cifar_dir).lower():
        assert ds.mean == KNOWN_STATS["cifar10"][0]


def test_default_data_path():
    p = default_data_path()
    assert p is None or (Path(p) / "train").is_dir()


def _write_idx(path: Path, arr: np.ndarray, magic: int):
    data = (
        struct.pack(">I", magic)
        + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        + arr.astype(np.uint8).tobytes()
    )
    with gzip.open(path, "wb") as f:
        f.write(data)


def make_fmnist(root: Path, n_train=12, n_test=6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            root / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            0x00000803,
        )
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x00000801)
    return root


@pytest.mark.parametrize("in_chans", [1, 3])
def test_fashion_mnist_idx(tmp_path, in_chans):
    root = make_fmnist(tmp_path / "fmnist")
    assert detect_kind(root) == "fmnist"
    ds = _build(root, img_size=28, in_chans=in_chans, labelled=True)
    assert len(ds) == 12 and ds.labels == [i % 10 for i in range(12)]
    assert ds[3][0].shape == (in_chans, 28, 28) and ds[3][1] == 3
    if in_chans == 1:
        assert ds.mean == KNOWN_STATS["fmnist"][0]
    val = _build(root, img_size=28, in_chans=in_chans, split="val", train_aug=False, labelled=True)
    assert len(val) == 6


def test_fashion_mnist_bad_files(tmp_path):
    root = make_fmnist(tmp_path / "f1")
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(12), 0x00000803)  # wrong magic
    with pytest.raises(DataError, match="magic number 0x00000803, expected 0x00000801"):
        scan_source(_cfg(root), "train", labelled=True)
    root = make_fmnist(tmp_path / "f2")
    p = root / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100]))
    with pytest.raises(DataError, match="truncated IDX"):
        scan_source(_cfg(root), "train", labelled=True)
    p.write_bytes(p.read_bytes()[:30])  # a cut-off .gz
    with pytest.raises(DataError, match="cannot read"):
        scan_source(_cfg(root), "train", labelled=True)
    root = make_fmnist(tmp_path / "f3", n_train=12)
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(11), 0x00000801)
    with pytest.raises(DataError, match="12 images but 11 labels"):
        scan_source(_cfg(root), "train", labelled=True)


def test_builtin_photos():
    one = _build("builtin:photos:astronaut", img_size=32)
    assert (
        len(one) == 1 and one[0][0].shape == (3, 32, 32) and one.mean == KNOWN_STATS["imagenet"][0]
    )
    allp = _build("builtin:photos", img_size=16, in_chans=1)
    assert len(allp) == 5 and all(allp[i][0].shape == (1, 16, 16) for i in range(5))
    with pytest.raises(DataError, match="no labels"):
        _build("builtin:photos", labelled=True)
    with pytest.raises(DataError, match="unknown builtin photo"):
        _build("builtin:photos:nope")


def test_npy_five_channels_end_to_end(tmp_path):
    root = tmp_path / "multispectral"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        np.save(root / f"{k}.npy", rng.integers(0, 256, (20, 24, 5), dtype=np.uint8))
    ds = _build(root, in_chans=5)
    assert ds.mean == [0.5] * 5
    x, y, _, k = next(iter(DataLoader(ds, batch_size=3)))
    assert x.shape == (3, 5, 16, 16) and torch.isfinite(x).all() and k.sum() == 0
    mean, std = compute_mean_std(_cfg(root), 5, 16)
    assert len(mean) == 5 and all(0.4 < m < 0.6 for m in mean)
    with pytest.raises(BadImageError, match="5 channels, model.in_chans is 3"):
        load_image(root / "0.npy", 3)


def test_one_channel_end_to_end(tmp_path):
    root = tmp_path / "gray"
    root.mkdir()
    _save_const(root / "a.png", 40, mode="L")
    np.save(root / "b.npy", np.full((20, 20), 200, np.uint8))  # [H, W] arrays are 1-channel
    ds = _build(root, in_chans=1, train_aug=False)
    a, b = ds[0][0], ds[1][0]
    assert a.shape == b.shape == (1, 16, 16) and ds.mean == [0.5]
    assert torch.allclose(a, torch.full_like(a, (40 / 255 - 0.5) / 0.5), atol=1e-3)
    assert torch.allclose(b, torch.full_like(b, (200 / 255 - 0.5) / 0.5), atol=1e-3)


def test_npy_dtypes_and_bad_arrays(tmp_path):
    def load(name, arr, c=3):
        np.save(tmp_path / name, arr)
        return load_image(tmp_path / name, c)

    assert load("u16.npy", np.full((2, 2, 3), 65535, np.uint16)).max() == 255
    assert load("u16b.npy", np.full((2, 2, 3), 1000, np.uint16)).max() == 4  # scaled, not clipped
    assert load("f01.npy", np.full((2, 2, 3), 0.5, np.float32)).max() == 128
    assert load("f255.npy", np.full((2, 2, 3), 300.0)).max() == 255
    assert load("bool.npy", np.ones((2, 2, 1), bool)).tolist() == [[[255] * 2] * 2] * 3
    with pytest.raises(BadImageError, match="NaN"):
        load("nan.npy", np.full((2, 2, 3), np.nan, np.float32))
    with pytest.raises(BadImageError, match=r"looks like \[C, H, W\]"):
        load("chw.npy", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(BadImageError, match=r"must be \[H, W, C\]"):
        load("1d.npy", np.zeros(8, np.uint8))
    with pytest.raises(BadImageError, match="obj.npy"):
        np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        load_image(tmp_path / "obj.npy", 3)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(BadImageError, match="junk.npy"):
        load_image(tmp_path / "junk.npy", 3)


def test_detect_kind(tmp_path, tiny_folder, bad_folder):
    assert detect_kind(tiny_folder / "train") == "imagefolder"
    assert detect_kind(bad_folder) == "folder"
    assert detect_kind(make_fmnist(tmp_path / "fm")) == "fmnist"


# ------------------------------------------------------------------------ determinism
def test_augmentation_seeded_by_seed_epoch_index(tiny_folder):
    ds = _build(tiny_folder, img_size=16)
    state = torch.get_rng_state()
    a = ds[(5, 0)][0]
    torch.manual_seed(123)  # the global RNG must not matter ...
    b = ds[(5, 0)][0]
    assert torch.equal(a, b)
    assert torch.equal(ds[5][0], a)  # int index means epoch 0
    assert not torch.equal(ds[(5, 1)][0], a)  # another epoch: another crop
    assert not torch.equal(ds[(6, 0)][0], ds[(6, 1)][0])
    other_seed = _build(tiny_folder, img_size=16, seed=1)
    assert not torch.equal(other_seed[(5, 0)][0], a)
    # ... and loading must not disturb it (masking and dropout use it with num_workers=0)
    torch.set_rng_state(state)
    ref = torch.rand(3)
    torch.set_rng_state(state)
    random.seed(5)
    py_ref = random.random()
    random.seed(5)
    ds[(7, 2)]
    assert torch.equal(torch.rand(3), ref) and random.random() == py_ref


def test_augmentation_same_in_workers(tiny_folder):
    ds = _build(tiny_folder, img_size=16)
    keys = [(i, 3) for i in range(8)]
    main = torch.stack([ds[k][0] for k in keys])
    got = torch.cat([b.images for b in DataLoader(ds, batch_size=2, num_workers=2, sampler=keys)])
    assert torch.equal(main, got)


def test_epoch_sampler_partitions_ranks():
    n, world = 103, 4
    full = list(EpochSampler(n, seed=0, epoch=0))
    assert sorted(i for i, _ in full) == list(range(n))
    parts = [list(EpochSampler(n, 0, 0, rank=r, world=world)) for r in range(world)]
    flat = [i for p in parts for i, _ in p]
    assert all(
        len(p) == n // world == len(EpochSampler(n, 0, 0, r, world)) for r, p in enumerate(parts)
    )
    assert len(set(flat)) == len(flat)  # no overlap
    assert set(flat) == {i for i, _ in full[: (n // world) * world]}
    assert all(e == 0 for p in parts for _, e in p)


def test_epoch_sampler_start_skips_exactly():
    full = list(EpochSampler(50, 7, 2))
    assert list(EpochSampler(50, 7, 2, start=13)) == full[13:]
    assert len(EpochSampler(50, 7, 2, start=13)) == 37
    parts = [list(EpochSampler(50, 7, 2, rank=r, world=2, start=10)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(full[10:])
    assert [x for pair in zip(*parts) for x in pair] == full[10:]
    assert (
        len(EpochSampler(50, 7, 2, start=60)) == 0 and list(EpochSampler(50, 7, 2, start=60)) == []
    )


def test_epoch_sampler_epochs_differ():
    e0 = [i for i, _ in EpochSampler(64, 0, 0)]
    assert e0 == [i for i, _ in EpochSampler(64, 0, 0)]
    assert e0 != [i for i, _ in EpochSampler(64, 0, 1)]
    assert e0 != [i for i, _ in EpochSampler(64, 1, 0)]
    assert [i for i, _ in EpochSampler(5, 0, 0, shuffle=False)] == list(range(5))


# ------------------------------------------------------------------------ subsets
LABELS = [c for c in range(5) for _ in range(10)]


def test_subset_random():
    a = subset_indices(LABELS, 7, "random", 0)
    assert a == sorted(set(a)) and len(a) == 7 and a == subset_indices(LABELS, 7, "random", 0)
    assert a != subset_indices(LABELS, 7, "random", 1)
    assert subset_indices(LABELS, 100, "random", 0) == list(range(50))


def test_subset_one_per_class():
    one = subset_indices(LABELS, 5, "one_per_class", 0)
    assert sorted(LABELS[i] for i in one) == [0, 1, 2, 3, 4]
    counts = np.bincount([LABELS[i] for i in subset_indices(LABELS, 12, "one_per_class", 3)])
    assert counts.sum() == 12 and counts.min() >= 2 and counts.max() <= 3
    unl = subset_indices([-1] * 20, 4, "one_per_class", 0)  # unlabelled: random
    assert len(unl) == 4


def test_subset_one_class():
    s = subset_indices(LABELS, 6, "one_class", 0)
    assert len(s) == 6 and len({LABELS[i] for i in s}) == 1
    assert len(subset_indices(LABELS, 30, "one_class", 0)) == 10  # capped at the class size
    with pytest.raises(DataError, match="unknown subset strategy"):
        subset_indices(LABELS, 3, "stratified", 0)


def test_balanced_fraction():
    labels = [0] * 10 + [1] * 20 + [2] * 3
    keep = balanced_fraction(labels, 0.1, seed=0)
    assert np.bincount([labels[i] for i in keep]).tolist() == [1, 2, 1]  # >= 1 per class
    assert keep == balanced_fraction(labels, 0.1, seed=0)
    assert keep == sorted(set(keep))
    half = balanced_fraction(labels, 0.5, seed=0)
    assert np.bincount([labels[i] for i in half]).tolist() == [5, 10, 2]
    assert balanced_fraction(labels, 0.5, seed=1) != half
    assert balanced_fraction(labels, 1.0, seed=0) == list(range(len(labels)))
    with pytest.raises(ValueError):
        balanced_fraction(labels, 0.0, seed=0)


def test_build_dataset_limit_and_label_fraction(tiny_folder):
    ds = _build(tiny_folder, labelled=True, limit=6, subset="one_per_class")
    assert len(ds) == 6 and np.bincount(ds.labels).tolist() == [2, 2, 2]
    ds = build_dataset(
        _cfg(tiny_folder), "train", 16, 3, 0, train_aug=True, labelled=True, label_fraction=0.25
    )
    assert np.bincount(ds.labels).tolist() == [2, 2, 2]
    assert len(_build(tiny_folder, repeat=3)) == 72


# ------------------------------------------------------------------------ statistics
def test_compute_mean_std_known_colours(tmp_path):
    root = tmp_path / "colours"
    root.mkdir()
    for name, c in (
        ("red", (255, 0, 0)),
        ("blue", (0, 0, 255)),
        ("white", (255, 255, 255)),
        ("black", (0, 0, 0)),
    ):
        _save_const(root / f"{name}.png", c)
    mean, std = compute_mean_std(_cfg(root), 3, 8)
    assert mean == pytest.approx([0.5, 0.25, 0.5], abs=1e-3)
    assert std == pytest.approx([0.5, 0.4330, 0.5], abs=1e-3)
    g_mean, g_std = compute_mean_std(_cfg(root), 1, 8)  # luminance: 76, 29, 255, 0
    lum = np.array([76, 29, 255, 0]) / 255
    assert g_mean == pytest.approx([lum.mean()], abs=1e-3)
    assert g_std == pytest.approx([lum.std()], abs=1e-3)


def test_resolve_stats():
    src = Source("imagefolder", [], [], [])
    assert resolve_stats(_cfg("/data/CIFAR10-copy"), src, 3) == tuple(
        map(list, KNOWN_STATS["cifar10"])
    )
    assert resolve_stats(_cfg("/data/pets"), src, 3) == tuple(map(list, KNOWN_STATS["imagenet"]))
    assert resolve_stats(_cfg("/data/cifar10"), src, 1) == ([0.5], [0.5])
    assert resolve_stats(_cfg("/x", mean=[0.1], std=[0.2]), src, 1) == ([0.1], [0.2])
    with pytest.raises(DataError, match="in_chans is 3"):
        resolve_stats(_cfg("/x", mean=[0.1], std=[0.2]), src, 3)


# ------------------------------------------------------------------------ data at scale
def test_detect_kind_shards_and_hf(tmp_path):
    (tmp_path / "sh" / "train").mkdir(parents=True)
    (tmp_path / "sh" / "train" / "train-000000.tar").write_bytes(b"")
    assert detect_kind(tmp_path / "sh") == "wds"  # .tar one folder down
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "_info.json").write_text("{}")
    assert detect_kind(tmp_path / "idx") == "wds"
    (tmp_path / "hf" / "data").mkdir(parents=True)
    (tmp_path / "hf" / "data" / "train-00000-of-00001.parquet").write_bytes(b"")
    assert detect_kind(tmp_path / "hf") == "hf"
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    assert detect_kind(tmp_path / "saved") == "hf"
    with pytest.raises(DataError, match="unknown kind 'tfds'.*wds \\| hf"):
        scan_source(_cfg(tmp_path / "sh", kind="tfds"), "train", labelled=False)


def test_decode_image_bytes_matches_load_image(tiny_folder, tmp_path):
    from mimlab.data.datasets import decode_image_bytes

    f = sorted((tiny_folder / "train" / "class1").glob("*.png"))[0]
    assert torch.equal(decode_image_bytes(f.read_bytes(), ".png", 3, "x"), load_image(f, 3))
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    buf = io.BytesIO()
    np.save(buf, a)
    assert decode_image_bytes(buf.getvalue(), "npy", 5, "arr").shape == (5, 2, 3)
    with pytest.raises(BadImageError, match="sample-7: empty file"):
        decode_image_bytes(b"", "jpg", 3, "sample-7")
    with pytest.raises(BadImageError, match="missing.png: not a readable image"):
        load_image(tmp_path / "missing.png", 3)


def test_source_reader_feeds_image_dataset():
    calls = []

    def reader(item, in_chans):
        calls.append(item)
        return torch.full((in_chans, 4, 4), item, dtype=torch.uint8)

    src = Source("hf", [10, 20, 30], [0, 1, 0], ["a", "b"], reader=reader)
    ds = ImageDataset(src, None, 3)
    assert [int(ds[i][0][0, 0, 0]) for i in range(3)] == [10, 20, 30] and calls == [10, 20, 30]
