"""The built-in offline dataset: images a CNN can actually learn, deterministic by seed.

Each class owns a smooth random colour texture (a low-resolution random field, upsampled).
A sample is its class's texture, shifted (circularly, up to a quarter of the image), with
random contrast, blended with another class's texture as a distractor, plus pixel noise.
Translation invariance and texture are what convolutions are good at, the distractor and
noise keep it from being trivial, and it costs nothing to download.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bundle import DatasetBundle, InMemorySplit

DEFAULT_TRAIN_SAMPLES = 2048  # the demo: ~3 minutes for DD and the baseline on 2 cores
DEFAULT_TEST_SAMPLES = 1024


def _textures(num_classes: int, image_size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(num_classes, channels, 6, 6, generator=generator)
    fine = F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return fine / fine.flatten(1).std(dim=1).view(-1, 1, 1, 1)


def _samples(textures: torch.Tensor, count: int, generator: torch.Generator,
             noise: float, distractor: float) -> InMemorySplit:
    num_classes, channels, size, _ = textures.shape
    labels = torch.randint(num_classes, (count,), generator=generator)
    others = (labels + torch.randint(1, num_classes, (count,), generator=generator)) % num_classes
    images = torch.empty(count, channels, size, size)
    shifts = torch.randint(-size // 4, size // 4 + 1, (count, 4), generator=generator)
    contrast = 0.6 + 0.8 * torch.rand(count, generator=generator)
    mix = distractor * torch.rand(count, generator=generator)
    for i in range(count):
        main = torch.roll(textures[labels[i]], (int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
        side = torch.roll(textures[others[i]], (int(shifts[i, 2]), int(shifts[i, 3])), dims=(1, 2))
        images[i] = contrast[i] * main + mix[i] * side
    images += noise * torch.randn(images.shape, generator=generator)
    pixels = (images * 40 + 128).clamp_(0, 255).round_().to(torch.uint8)  # stored like CIFAR
    return InMemorySplit(pixels.contiguous(), labels.to(torch.int64))


def make_synthetic(train_samples: int | None, test_samples: int | None, *, num_classes: int = 10,
                   image_size: int = 32, channels: int = 3, seed: int = 0,
                   noise: float = 1.2, distractor: float = 0.9) -> DatasetBundle:
    """The same data on every rank for the same arguments (no communication needed). The test
    set draws from its own generator: runs with other --train-samples are scored on the same
    test images (it once followed the training draws)."""
    generator = torch.Generator().manual_seed(10_007 + seed)
    textures = _textures(num_classes, image_size, channels, generator)
    train = _samples(textures, train_samples or DEFAULT_TRAIN_SAMPLES, generator, noise, distractor)
    test_generator = torch.Generator().manual_seed(20_011 + seed)
    test = _samples(textures, test_samples or DEFAULT_TEST_SAMPLES, test_generator, noise, distractor)
    scaled = train.images.float() / 255
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3)).tolist())
    return DatasetBundle(name="synthetic", num_classes=num_classes, in_channels=channels,
                         image_size=image_size, mean=mean, std=std, train=train, test=test,
                         class_names=tuple(f"texture{c}" for c in range(num_classes)))
