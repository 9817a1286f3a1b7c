import numpy as np
import torch
from PIL import Image

from incseg.data.dataset import MEAN, STD, SegmentationFolder, eval_transforms, train_transforms
from incseg.data.layout import BatchInfo, copy_pair, find_pairs, list_files, read_image, read_mask, write_pair


def blocky_sample(rng):
    """An image whose pixels encode their own label: label = red level / 60."""
    labels = rng.integers(0, 4, (4, 4)).repeat(16, 0).repeat(16, 1).astype(np.uint8)
    image = np.stack([labels * 60] * 3, axis=-1).astype(np.uint8)
    return image, labels


def decoded_agreement(image, mask, margin=2):
    """Share of pixels whose label decoded from the image equals the mask, away from edges
    (where interpolation legitimately blends two labels)."""
    red = image[0] * STD[0] + MEAN[0]  # back to [0, 1]
    decoded = torch.round(red * 255 / 60).long()
    interior = torch.ones_like(mask, dtype=torch.bool)
    for d in range(1, margin + 1):
        for dim in (0, 1):
            for s in (d, -d):
                interior &= torch.roll(mask, s, dim) == mask
    return (decoded == mask)[interior].float().mean().item()


def test_random_crops_and_flips_keep_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    tf = train_transforms(32, augment=True, crop_probability=1.0)
    aligned, misaligned = [], []
    for i in range(20):
        image, mask = blocky_sample(rng)
        torch.manual_seed(i)
        img_t, mask_t = tf(image, mask)
        aligned.append(decoded_agreement(img_t, mask_t))
        torch.manual_seed(1000 + i)  # same transform, other random draw for the mask alone
        _, other_mask = tf(image, mask)
        misaligned.append(decoded_agreement(img_t, other_mask))
    assert min(aligned) > 0.95 and np.mean(aligned) > 0.99, aligned
    assert np.mean(misaligned) < 0.8


def test_crop_probability_sets_the_share_of_cropped_samples():
    """Uncropped samples are the evaluation view, flipped or not; cropped ones are neither."""
    image, mask = blocky_sample(np.random.default_rng(2))
    _, whole = eval_transforms(32)(image, mask)

    def cropped_share(p: float) -> float:
        tf = train_transforms(32, augment=True, crop_probability=p)
        torch.manual_seed(0)
        views = [tf(image, mask)[1] for _ in range(200)]
        return np.mean([not (torch.equal(v, whole) or torch.equal(v, whole.flip(-1))) for v in views])

    assert cropped_share(0.0) == 0.0
    assert 0.35 < cropped_share(0.5) < 0.65  # a crop of 50-100 % of the area changes the mask (binomial sd 0.035)
    assert cropped_share(1.0) > 0.9



def test_color_jitter_changes_the_image_within_its_range_and_never_the_mask():
    image, mask = blocky_sample(np.random.default_rng(3))
    plain, jittered = (train_transforms(32, augment=True, crop_probability=0.0, color_jitter=s) for s in (0.0, 0.4))
    means = []
    for i in range(50):
        torch.manual_seed(i)
        x0, y0 = plain(image, mask)
        torch.manual_seed(i)
        x1, y1 = jittered(image, mask)
        assert torch.equal(y0, y1)  # the same flip; labels untouched
        pixels = x1 * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4  # still valid 0-1 colours
        means.append((x1 - x0).abs().mean().item())
    assert np.median(means) > 0.05  # most draws move the image visibly (normalised units)
    # off draws nothing: the random stream, and so earlier runs, are reproduced
    torch.manual_seed(7)
    plain(image, mask)
    after_plain = torch.rand(1)
    torch.manual_seed(7)
    train_transforms(32, augment=True, crop_probability=0.0)(image, mask)
    assert torch.equal(after_plain, torch.rand(1))
    evaluation = train_transforms(32, augment=False, crop_probability=0.0, color_jitter=0.4)
    assert evaluation.jitter is None  # evaluation never jitters

def test_masks_stay_integer_label_maps_after_resize():
    image, mask = blocky_sample(np.random.default_rng(1))
    img_t, mask_t = eval_transforms(40)(image, mask)
    assert img_t.shape == (3, 40, 40) and mask_t.dtype == torch.int64
    assert set(mask_t.unique().tolist()) <= set(np.unique(mask).tolist())


def test_palette_png_masks_load_as_label_ids(tmp_path):
    ids = np.array([[0, 1, 2], [15, 255, 3]], dtype=np.uint8)
    im = Image.fromarray(ids, "P")
    palette = np.random.default_rng(0).integers(0, 255, 768).astype(np.uint8)
    im.putpalette(palette.tolist())
    im.save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "P"
    assert np.array_equal(read_mask(tmp_path / "m.png"), ids)


def test_pairs_are_matched_by_stem_and_annotation_flags(tmp_path):
    rng = np.random.default_rng(2)
    for stem in ("a", "b"):
        write_pair(tmp_path, stem, *blocky_sample(rng))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / "orphan.png")
    pairs = find_pairs(tmp_path)
    assert [p.stem for p in pairs] == ["a", "b"]
    ds = SegmentationFolder(pairs, eval_transforms(16), num_classes=5, annotated=[2])
    _, _, annotated = ds[0]
    assert annotated.tolist() == [True, False, True, False, False]
    assert BatchInfo.read(tmp_path).classes == [0, 1, 2, 3]


def test_layout_lists_files_by_suffix_and_copies_pairs_under_its_names(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    image, mask = blocky_sample(np.random.default_rng(3))
    write_pair(src, "a", image, mask)
    Image.fromarray(image).save(src / "images" / "b.JPG")
    (src / "masks" / "b.png").write_bytes((src / "masks" / "a.png").read_bytes())
    (src / "images" / "notes.txt").write_text("not an image")
    (src / "images" / "folder.png").mkdir()
    assert [p.name for p in list_files(src / "images")] == ["a.png", "b.JPG"]
    assert list_files(tmp_path / "missing") == []
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True)
    for pair in find_pairs(src):
        copy_pair(pair, out, stem=f"x-{pair.stem}")
    assert [p.name for p in list_files(out / "images")] == ["x-a.png", "x-b.jpg"]
    assert [p.stem for p in find_pairs(out)] == ["x-a", "x-b"]
    assert np.array_equal(read_image(out / "images" / "x-a.png"), image)
    assert np.array_equal(read_mask(out / "masks" / "x-b.png"), mask)
    copy_pair(find_pairs(src)[0], out, stem="y", mask=mask + 1)  # a relabelled mask is written in its place
    assert np.array_equal(read_mask(out / "masks" / "y.png"), mask + 1)
    assert np.array_equal(read_image(out / "images" / "y.png"), image)


def test_decoded_pairs_are_read_once_and_again_when_a_file_changes(tmp_path):
    """Epochs and evaluations re-read the same files: decoded once per process, until the file changes
    (same batch id, new content), and what a transform returns never writes back into the cache."""
    import os

    from incseg.data.dataset import read_pair

    image, mask = blocky_sample(np.random.default_rng(3))
    write_pair(tmp_path, "a", image, mask)
    [pair] = find_pairs(tmp_path)
    first = read_pair(pair)
    assert read_pair(pair) is first  # the cached arrays, not a second decode
    ds = SegmentationFolder([pair], train_transforms(32, True, 1.0), num_classes=5)
    for _ in range(3):
        img_t, _, _ = ds[0]
        img_t.add_(1.0)  # a consumer that modifies its sample in place
    assert np.array_equal(read_pair(pair)[0], image) and np.array_equal(read_pair(pair)[1], mask)

    changed = mask.copy()
    changed[:4, :4] = 4
    write_pair(tmp_path, "a", image, changed)
    stat = os.stat(pair.mask)
    os.utime(pair.mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # a new mtime even on coarse clocks
    again = read_pair(pair)
    assert again is not first and np.array_equal(again[1], changed)


def test_large_pairs_are_read_at_the_side_training_needs(tmp_path):
    """A camera frame was decoded (60 ms for a 2048 x 1024 PNG) and cropped at full size on every step, and
    the decoded-pair cache held 60 of them: training at 96 px spent more time reading than learning. A
    pair larger than `kept_side` of the training size is kept scaled down to it (aspect and ids kept);
    a small one is read as it is."""
    from incseg.data.dataset import kept_side, read_pair

    rng = np.random.default_rng(0)
    image = np.array(Image.fromarray(rng.integers(0, 255, (40, 80, 3), np.uint8)).resize((1600, 800)))
    mask = np.zeros((800, 1600), np.uint8)
    mask[200:600, 400:800], mask[:, 1500:] = 3, 255
    write_pair(tmp_path, "frame", image, mask)
    [pair] = find_pairs(tmp_path)
    assert kept_side(96) == 256 and kept_side(160) == 320
    small_image, small_mask = read_pair(pair, kept_side(96))
    assert small_image.shape == (256, 512, 3) and small_mask.shape == (256, 512)
    assert set(np.unique(small_mask)) == {0, 3, 255}
    assert abs((small_mask == 3).mean() - (mask == 3).mean()) < 0.01
    whole = read_pair(pair)
    assert whole[0].shape == (800, 1600, 3) and np.array_equal(whole[1], mask)
    ds = SegmentationFolder([pair], eval_transforms(96), num_classes=4)
    x, y, _ = ds[0]
    assert x.shape == (3, 96, 96) and set(torch.unique(y).tolist()) == {0, 3, 255}
    ref = torch.from_numpy(mask[None, None]).float()
    direct = torch.nn.functional.interpolate(ref, (96, 96), mode="nearest")[0, 0].long()
    assert (y == direct).float().mean() > 0.97  # what evaluation sees: as from the full-size mask


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A phone photo stores its pixels on their side and an EXIF orientation; viewers and labelling tools
    show it upright and its mask is drawn on that picture. Read raw, the image lay across its mask (the
    validation refused the pair for differing sizes; a square one trained misaligned). Reading,
    validation and the workspace's holdout size now see it upright."""
    from incseg.config import Params
    from incseg.validation.table import file_table
    from incseg.workspace import Workspace

    rng = np.random.default_rng(0)
    upright = rng.integers(0, 255, (60, 40, 3), np.uint8)  # portrait, as shown
    mask = np.zeros((60, 40), np.uint8)
    mask[:20] = 1
    holdout = tmp_path / "data" / "holdout"
    for sub in ("images", "masks"):
        (holdout / sub).mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(holdout / "images" / "p.png", exif=exif)
    Image.fromarray(mask).save(holdout / "masks" / "p.png")
    assert Image.open(holdout / "images" / "p.png").size == (60, 40)  # on its side, as stored
    assert np.array_equal(read_image(holdout / "images" / "p.png"), upright)
    row = file_table(holdout, 2).iloc[0]
    assert (row["width"], row["height"], bool(row["size_match"])) == (40, 60, True)
    assert Workspace(tmp_path, Params()).holdout_shape() == (60, 40)  # (height, width)
    exif[0x0112] = 99  # no such orientation: read as stored, not refused
    Image.fromarray(upright).save(tmp_path / "odd.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "odd.png"), upright)
