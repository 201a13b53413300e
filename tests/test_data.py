"""Datasets: synthetic recipe, PNG I/O, image/mask folders (and their errors), Synapse files, sampler,
augmentation."""

import os

import numpy as np
import pytest
import torch

from emcad.data import (Augmented, DatasetError, ImageMaskFolder, ImageReadError, SynapseSlices, SynapseVolumes,
                        SyntheticSegmentation, make_synthetic_sample, read_image, remap_synapse_labels,
                        split_indices, write_png)
from emcad.data import io as eio
from emcad.data.synthetic import foreground_fraction
from emcad.training.sampler import ResumableBatchSampler

try:
    import PIL.Image as Image
except ImportError:  # pragma: no cover
    Image = None


# ---------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_follows_the_recipe():
    a, b = SyntheticSegmentation(48, seed=1), SyntheticSegmentation(48, seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, SyntheticSegmentation(48, seed=2).images)
    assert not torch.equal(a.images, SyntheticSegmentation(48, seed=1, split="val").images)
    img, lab = a[0]
    assert img.shape == (1, 64, 64) and img.dtype == torch.float32 and lab.dtype == torch.int64
    assert torch.equal(make_synthetic_sample(1234)[0], make_synthetic_sample(1234)[0])
    big = SyntheticSegmentation(256, seed=0)
    frac = foreground_fraction(big.labels)
    assert 0.03 < frac[1] < 0.08 and 0.03 < frac[2] < 0.08  # about 5% per class
    # the ring's mean intensity is close to the background's: a threshold cannot find it, the lesion is bright
    bg = big.images[:, 0][big.labels == 0].mean()
    ring = big.images[:, 0][big.labels == 2].mean()
    lesion = big.images[:, 0][big.labels == 1].mean()
    bg_std = big.images[:, 0][big.labels == 0].std()
    assert abs(ring - bg) < 0.6 * bg_std and lesion - bg > 0.6 > ring - bg  # +0.45*1.2 - 0.55*0.4 = +0.32


# ---------------------------------------------------------------------------------------------------
# PNG I/O
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pillow", [True, False])
def test_png_roundtrip_with_and_without_pillow(tmp_path, monkeypatch, pillow):
    if pillow and Image is None:
        pytest.skip("Pillow not installed")
    monkeypatch.setattr(eio, "_have_pillow", lambda: pillow)
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 256, (13, 17), dtype=np.uint8), rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
                rng.integers(0, 65536, (6, 4), dtype=np.uint16)):
        write_png(tmp_path / "a.png", arr)
        assert np.array_equal(read_image(tmp_path / "a.png"), arr)
    if not pillow:
        (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff")
        with pytest.raises(ImageReadError, match="needs Pillow"):
            read_image(tmp_path / "x.jpg")


@pytest.mark.skipif(Image is None, reason="Pillow not installed")
def test_fallback_png_decoder_matches_pillow(tmp_path):
    rng = np.random.default_rng(1)
    src = Image.fromarray(rng.integers(0, 256, (19, 23, 3), dtype=np.uint8))
    for mode in ("L", "RGB", "P", "1", "RGBA"):
        p = tmp_path / f"{mode}.png"
        src.convert(mode).save(p, optimize=True)
        for as_mask in (False, True):
            assert np.array_equal(eio._read_png(str(p), as_mask), eio._read_pillow(str(p), as_mask)), mode


# ---------------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------------
def _make_folder(root, n=4, size=(40, 48), mask_values=(0, 255), colour=False):
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = size + ((3,) if colour else ())
        write_png(root / "images" / f"case{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
        mask = np.zeros(size, np.uint8)
        for j, v in enumerate(mask_values[1:]):
            mask[5 + 6 * j:10 + 6 * j, 5:20] = v
        write_png(root / "masks" / f"case{i}.png", mask)


def test_folder_binary_and_multiclass(tmp_path):
    _make_folder(tmp_path / "bin", colour=True)
    ds = ImageMaskFolder(tmp_path / "bin", size=(32, 32))
    assert ds.num_classes == 1 and ds.mask_mode == "binary" and ds.in_channels == 3 and len(ds) == 4
    img, lab = ds[0]
    assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
    assert set(lab.unique().tolist()) == {0, 1}
    _make_folder(tmp_path / "multi", mask_values=(0, 1, 2, 3))
    ds = ImageMaskFolder(tmp_path / "multi", size=None)
    assert ds.num_classes == 4 and ds.mask_mode == "multiclass" and ds.in_channels == 1
    assert set(ds[1][1].unique().tolist()) == {0, 1, 2, 3} and ds[1][0].shape == (1, 40, 48)
    with pytest.raises(DatasetError, match="outside the 3 classes"):
        ImageMaskFolder(tmp_path / "multi", num_classes=3)


def test_folder_unpaired_files_are_named(tmp_path):
    _make_folder(tmp_path)
    os.remove(tmp_path / "masks" / "case2.png")
    write_png(tmp_path / "masks" / "orphan.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError) as e:
        ImageMaskFolder(tmp_path)
    assert "case2.png" in str(e.value) and "orphan.png" in str(e.value) and "unpaired" in str(e.value)


def test_folder_unreadable_file_is_named(tmp_path):
    _make_folder(tmp_path)
    bad = tmp_path / "images" / "case1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(DatasetError, match="case1.png"):
        ImageMaskFolder(tmp_path)
    (tmp_path / "images" / "case1.png").write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match="case1.png"):
        ImageMaskFolder(tmp_path)


def test_folder_size_mismatch_and_colour_mask(tmp_path):
    _make_folder(tmp_path)
    write_png(tmp_path / "masks" / "case3.png", np.zeros((40, 40), np.uint8))
    with pytest.raises(DatasetError, match=r"size mismatch.*case3\.png.*case3\.png"):
        ImageMaskFolder(tmp_path)
    write_png(tmp_path / "masks" / "case3.png", np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"case3\.png.*colour"):
        ImageMaskFolder(tmp_path)


def test_folder_mask_suffix_and_missing_dir(tmp_path):
    _make_folder(tmp_path)
    for f in os.listdir(tmp_path / "masks"):
        os.rename(tmp_path / "masks" / f, tmp_path / "masks" / f.replace(".png", "_segmentation.png"))
    assert len(ImageMaskFolder(tmp_path, mask_suffix="_segmentation")) == 4
    with pytest.raises(DatasetError, match="does not exist"):
        ImageMaskFolder(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------
# Synapse
# ---------------------------------------------------------------------------------------------------
def test_synapse_slices_and_volumes(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "train_npz"
    d.mkdir()
    for case in (5, 6):
        for s in range(2):
            lab = rng.integers(0, 9, (40, 40))
            np.savez(d / f"case{case:04d}_slice{s:03d}.npz", image=rng.random((40, 40), dtype=np.float32), label=lab)
    ds = SynapseSlices(d, size=(32, 32))
    img, lab = ds[0]
    assert len(ds) == 4 and img.shape == (1, 32, 32) and lab.shape == (32, 32) and int(lab.max()) <= 8
    (tmp_path / "list.txt").write_text("case0005_slice000\ncase0009_slice000\n")
    with pytest.raises(DatasetError, match="case0009_slice000.npz"):
        SynapseSlices(d, list_file=tmp_path / "list.txt")
    np.savez(d / "case0007_slice000.npz", image=np.zeros((4, 4)), label=np.full((4, 4), 13))
    with pytest.raises(DatasetError, match="case0007_slice000.npz.*0..8"):
        SynapseSlices(d, names=["case0007_slice000"]).load(0)
    assert SynapseSlices(d, names=["case0007_slice000"], remap=True).load(0)[1].max() == 0
    assert remap_synapse_labels(np.array([11, 5, 13, 8])).tolist() == [5, 0, 0, 8]
    (d / "case0008_slice000.npz").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(DatasetError, match="case0008_slice000.npz"):
        SynapseSlices(d, names=["case0008_slice000"]).load(0)
    v = tmp_path / "vols"
    v.mkdir()
    np.savez(v / "case0001.npz", image=rng.random((3, 16, 16)), label=rng.integers(0, 9, (3, 16, 16)))
    name, image, label = SynapseVolumes(v)[0]
    assert name == "case0001" and image.shape == (3, 16, 16)


def test_h5_volume_without_h5py_gives_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_h5py(name, *a, **k):
        if name == "h5py":
            raise ImportError("no h5py")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    (tmp_path / "case0001.npy.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(DatasetError, match="case0001.npy.h5.*needs h5py"):
        SynapseVolumes(tmp_path)[0]


# ---------------------------------------------------------------------------------------------------
# sampler, split, augmentation
# ---------------------------------------------------------------------------------------------------
def test_sampler_shards_global_batches_and_resumes():
    single = list(ResumableBatchSampler(20, 4, seed=7))
    ranks = [list(ResumableBatchSampler(20, 4, seed=7, num_replicas=2, rank=r)) for r in range(2)]
    assert len(single) == 5 and all(len(b) == 2 for b in ranks[0])
    assert [a + b for a, b in zip(*ranks)] == single  # each step: the same global batch
    s = ResumableBatchSampler(20, 4, seed=7)
    s.set_epoch(3)
    full = list(s)
    s.set_start(2)
    assert list(s) == full[2:]
    assert full != single
    with pytest.raises(ValueError, match="divisible"):
        ResumableBatchSampler(20, 3, num_replicas=2)
    tr, va = split_indices(50, 0.1, seed=0)
    assert len(va) == 5 and not set(tr) & set(va) and split_indices(50, 0.1, seed=0) == (tr, va)


def test_augmentation_depends_only_on_seed_epoch_and_index():
    ds = Augmented(SyntheticSegmentation(6, size=32), seed=1)
    first = [ds[i] for i in range(6)]
    again = [ds[i] for i in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    ds.set_epoch(1)
    assert any(not torch.equal(a[0], ds[i][0]) for i, a in enumerate(first))
    assert ds.num_classes == 3 and ds.in_channels == 1
