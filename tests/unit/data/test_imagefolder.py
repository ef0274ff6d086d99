"""The imagefolder dataset: the image size of the majority, channels, 16-bit grayscale scaled, a truncated
image named before training."""
import numpy as np
import pytest
from PIL import Image

from helpers import ONE_EPOCH_GRID, one_line_error, run_cli


def _pngs(root, sizes, mode="L"):
    """train/<class>/ and test/<class>/ PNGs; ``sizes`` are the train images' (width, height), cycled over 2 classes."""
    import numpy as np
    from PIL import Image
    for split, wanted in (("train", sizes), ("test", [(8, 8)] * 2)):
        for i, (w, h) in enumerate(wanted):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            channels = () if mode == "L" else (3,)
            Image.fromarray(np.full((h, w, *channels), 40 * i % 256, dtype=np.uint8), mode=mode).save(
                folder / f"{i}.png")


def test_imagefolder_size_is_the_majority_not_the_first_image(tmp_path):
    """One 6000 px image (sorted first) among 8 px ones used to upscale everything to 6000 px."""
    from kd2m.data import build_dataset
    from kd2m.data.imagefolder import ImageSizeWarning
    _pngs(tmp_path, [(6000, 6000)] + [(8, 8)] * 5)
    with pytest.warns(ImageSizeWarning, match=r"1 of 6 training images are not 8×8.*resized to 8×8"):
        bundle = build_dataset("imagefolder", data_root=tmp_path, augment=False)
    assert bundle.image_size == 8
    assert tuple(bundle.train[0][0].shape) == (1, 8, 8)   # the big one, downscaled


def test_imagefolder_explicit_size_and_majority_channels(tmp_path):
    import warnings

    from kd2m.data.imagefolder import imagefolder
    _pngs(tmp_path, [(8, 8)] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # same-size images: nothing to say
        bundle = imagefolder(tmp_path, augment=False, image_size=5)
    assert bundle.image_size == 5 and tuple(bundle.train[1][0].shape) == (1, 5, 5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            imagefolder(tmp_path, image_size=bad)
    from PIL import Image
    mixed = tmp_path / "mixed"
    for split in ("train", "test"):
        (mixed / split / "c0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(mixed / "train" / "c0" / "0.png")      # the first image is RGB,
    for i in range(1, 4):                                                 # the other three grayscale
        Image.new("L", (8, 8)).save(mixed / "train" / "c0" / f"{i}.png")
    Image.new("L", (8, 8)).save(mixed / "test" / "c0" / "0.png")
    assert imagefolder(mixed, augment=False).in_channels == 1


def _imagefolder(root, make):
    for split in ("train", "test"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(4):
                make(d / f"{i}.png", c, i)


def test_16_bit_grayscale_pngs_are_scaled_not_clipped(tmp_path):
    from kd2m.data.imagefolder import _load
    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)       # 0 … 63000 of 65535
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    got = np.asarray(_load(str(tmp_path / "i16.png"), "L"))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.rint(values * (255 / 65535)).astype(np.uint8))
    assert len(np.unique(got)) > 50                                    # convert('L') gave only 0 and 255


def test_a_truncated_image_is_refused_before_training_naming_the_file(tmp_path, capsys):
    def png(path, c, i):
        Image.fromarray(np.full((8, 8, 3), 40 * c + i, dtype=np.uint8)).save(path)
    _imagefolder(tmp_path / "data", png)
    bad = tmp_path / "data/test/c1/2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    code, _, err = run_cli(["run", "--dataset", "imagefolder", "--data-root", tmp_path / "data", *ONE_EPOCH_GRID,
                            "--baselines", "ce", "--metrics", "", "--out", tmp_path / "o"], capsys)
    one_line_error(code, err, "c1/2.png", "not a readable image")
    assert not (tmp_path / "o" / "teacher").exists()
