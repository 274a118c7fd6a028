"""Image transforms: sizes, CLIP normalisation, IRRA augmentation, denormalize."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from tbps.config import DataConfig
from tbps.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform, denormalize
from tbps.errors import TBPSError


def _mean_colour_image(size=(20, 40)) -> Image.Image:
    return Image.new("RGB", size, tuple(round(m * 255) for m in CLIP_MEAN))


def _noise_image(size=(20, 40)) -> Image.Image:
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_test_transform_size_and_normalisation():
    out = build_image_transform([32, 16], train=False)(_mean_colour_image())
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # the mean colour normalises to ~0


def test_test_pipeline_is_bicubic_resize_then_clip_normalise():
    tf = build_image_transform([32, 16], train=False)
    steps = tf.transforms
    assert isinstance(steps[0], T.Resize) and list(steps[0].size) == [32, 16]
    assert steps[0].interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(steps[-1], T.Normalize)
    assert tuple(steps[-1].mean) == CLIP_MEAN and tuple(steps[-1].std) == CLIP_STD


def test_train_transform_irra_recipe():
    tf = build_image_transform([32, 16], train=True)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [T.Resize, T.RandomHorizontalFlip, T.Pad, T.RandomCrop, T.ToTensor, T.Normalize,
                     T.RandomErasing]
    assert tf.transforms[2].padding == 10
    assert tf.transforms[-1].scale == (0.02, 0.4)
    img = _noise_image()
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(0)
    b = tf(img)
    assert a.shape == (3, 32, 16) and torch.equal(a, b)
    outs = {tf(img).sum().item() for _ in range(4)}
    assert len(outs) > 1  # random


def test_train_without_augment_equals_test():
    img = _noise_image()
    plain = build_image_transform([32, 16], train=True, augment=False)(img)
    assert torch.equal(plain, build_image_transform([32, 16], train=False)(img))


def test_accepts_data_config():
    cfg = DataConfig(image_size=[24, 8], augment=False)
    tf = build_image_transform(cfg, train=True)
    assert len(tf.transforms) == 3
    assert tf(_noise_image()).shape == (3, 24, 8)


def test_denormalize_inverts_normalisation():
    img = _noise_image()
    normalised = build_image_transform([32, 16], train=False)(img)
    raw = T.Compose([T.Resize((32, 16), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()])(img)
    assert torch.allclose(denormalize(normalised), raw.clamp(0, 1), atol=1e-5)
    batch = denormalize(normalised.unsqueeze(0).repeat(2, 1, 1, 1))
    assert batch.shape == (2, 3, 32, 16) and batch.min() >= 0 and batch.max() <= 1
    with pytest.raises(ValueError):
        denormalize(torch.zeros(4, 8))


@pytest.mark.parametrize("size", [[384], [0, 128], "384x128", [384.5, 128]])
def test_bad_image_size(size):
    with pytest.raises(TBPSError, match="image_size"):
        build_image_transform(size, train=False)


def test_flip_only_gives_two_views_the_plain_one_and_its_mirror():
    img = _noise_image()
    plain = build_image_transform([32, 16], train=False)(img)
    tf = build_image_transform(DataConfig(image_size=[32, 16], augment=False, flip=True), train=True)
    assert [type(t) for t in tf.transforms] == [T.Resize, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    torch.manual_seed(0)
    views = {tuple(tf(img).flatten().tolist()) for _ in range(20)}
    assert views == {tuple(plain.flatten().tolist()), tuple(plain.flip(-1).flatten().tolist())}
    # evaluation never flips, and IRRA's full augmentation (which flips already) is unchanged by the key
    assert torch.equal(build_image_transform(DataConfig(image_size=[32, 16], flip=True), train=False)(img), plain)
    full = build_image_transform(DataConfig(image_size=[32, 16], flip=True), train=True)
    assert [type(t) for t in full.transforms][:3] == [T.Resize, T.RandomHorizontalFlip, T.Pad]
