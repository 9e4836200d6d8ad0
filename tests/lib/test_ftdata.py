"""Fine-tuning's data: images decoded by the reader the shell gives, augmentation drawn only
from its own generator."""

import random

import pytest
import torch
from PIL import Image

from tlflow.tasks.lib.finetune.data import Augment, Images, class_indices


def test_augmentation_draws_only_from_its_own_generator():
    aug = Augment(16, (0.3, 1.0), 0.5, "bilinear", (0.5,) * 3, (0.5,) * 3)
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    a = aug(img, random.Random("0:1:2"))
    random.seed(123)
    b = aug(img, random.Random("0:1:2"))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    boxes = {aug.crop_box(40, 30, random.Random(i)) for i in range(20)}
    assert len(boxes) > 10  # the crops do vary with the generator
    for top, left, h, w in boxes:
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w


def _decode(item, transform):  # the items are the images themselves: no file anywhere
    return transform(Image.new("RGB", (24, 20), item))


def test_the_dataset_decodes_through_the_reader_it_is_given():
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]
    targets = class_indices(["red", "green", "blue"], ("blue", "green", "red"))
    assert targets == [2, 1, 0]
    aug = Augment(8, (0.2, 1.0), 0.5, "bilinear", (0.5,) * 3, (0.5,) * 3)
    ds = Images(colours, targets, _decode, None, aug, seed=3)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y == 2
    assert x[0].mean() > 0.9 and x[1].mean() < -0.9  # red, normalized by (0.5, 0.5)
    first = [ds[i][0] for i in range(3)]
    again = [ds[i][0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="3 items but 2 targets"):
        Images(colours, targets[:2], _decode, None)
