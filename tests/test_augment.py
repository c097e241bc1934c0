"""The batched device augmentation (--augment-on device) against the PIL path it replaces:
the same distributions of crop scale, flip, colour jitter, grayscale, blur and solarisation,
and a training run through it."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import train_byol as B
from tiny_data import write_cifar10

N = 1500


def draw_both(image: np.ndarray, spec: D.ViewSpec, n: int = N):
    """n views of one image through each path, as floats in [0, 1], (n, 3, crop, crop)."""
    view = D.pil_view(spec, normalize=False)
    torch.manual_seed(0)
    pil = torch.stack([view(Image.fromarray(image)) for _ in range(n)])
    x = torch.from_numpy(image).permute(2, 0, 1)[None].expand(n, -1, -1, -1).contiguous()
    batched = D.batched_view(x, spec, torch.Generator().manual_seed(1))
    return pil, batched


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, tol: float):
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    qa, qb = np.quantile(a.numpy(), qs), np.quantile(b.numpy(), qs)
    assert np.abs(qa - qb).max() < tol, (qa.round(3), qb.round(3))


def coordinate_image(n=32):
    """Red encodes x, green encodes y: a view's extent and orientation can be read off it."""
    img = np.zeros((n, n, 3), np.uint8)
    img[..., 0] = np.linspace(0, 255, n)[None, :]
    img[..., 1] = np.linspace(0, 255, n)[:, None]
    return img


def test_crop_scale_aspect_and_flip_rate_match_the_pil_path():
    spec = D.ViewSpec(32, jitter_p=0.0, gray_p=0.0)
    pil, batched = draw_both(coordinate_image(), spec)
    for views in (pil, batched):
        views.extent_x = views[:, 0].amax((1, 2)) - views[:, 0].amin((1, 2))
        views.extent_y = views[:, 1].amax((1, 2)) - views[:, 1].amin((1, 2))
        views.flipped = ((views[:, 0, :, -1] - views[:, 0, :, 0]).mean(1) < 0).float()
    assert_same_distribution(pil.extent_x * pil.extent_y, batched.extent_x * batched.extent_y, 0.03)  # area
    assert_same_distribution(pil.extent_x / pil.extent_y, batched.extent_x / batched.extent_y, 0.06)  # aspect
    assert abs(pil.flipped.mean() - 0.5) < 0.05 and abs(batched.flipped.mean() - 0.5) < 0.05
    # The smallest crops are near 8% of the image, as the scale range asks.
    assert batched.extent_x.mul(batched.extent_y).min() < 0.12


def colourful_image():
    rng = np.random.default_rng(0)
    return np.kron(rng.integers(0, 255, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)


WHOLE = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)  # colour only: the view is the image


@pytest.mark.parametrize("colour", [
    dict(jitter=(0.4, 0, 0, 0), jitter_p=1.0, gray_p=0.0),   # brightness alone
    dict(jitter=(0, 0.4, 0, 0), jitter_p=1.0, gray_p=0.0),   # contrast alone
    dict(jitter=(0, 0, 0.2, 0), jitter_p=1.0, gray_p=0.0),   # saturation alone
    dict(jitter=(0, 0, 0, 0.1), jitter_p=1.0, gray_p=0.0),   # hue alone
    dict(jitter_p=0.0, gray_p=0.0, blur_p=1.0),              # blur alone
    dict(),                                                  # view 1 of METHOD.md 6
    dict(solarize_p=0.2),                                    # view 2 of METHOD.md 6
], ids=["brightness", "contrast", "saturation", "hue", "blur", "view1", "view2"])
def test_colour_operations_match_the_pil_path(colour):
    pil, batched = draw_both(colourful_image(), D.ViewSpec(32, **WHOLE, **colour), n=800)
    for statistic in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3)),
                      lambda v: (v[:, 0] - v[:, 1]).mean((1, 2)), lambda v: (v[:, 1] - v[:, 2]).mean((1, 2))):
        assert_same_distribution(statistic(pil), statistic(batched), 0.02)


def test_grayscale_and_solarisation_rates():
    spec = D.ViewSpec(32, **WHOLE, jitter_p=0.0, gray_p=0.2, solarize_p=0.2)
    original = torch.from_numpy(colourful_image()).float().div(255).permute(2, 0, 1)
    solarised = torch.where(original >= 128 / 255, 1 - original, original)
    for views in draw_both(colourful_image(), spec):
        gray = (views[:, 0] - views[:, 1]).abs().amax((1, 2)) < 1e-6
        assert abs(gray.float().mean() - 0.2) < 0.04
        colour = views[~gray]
        inverted = (colour - solarised).abs().amax((1, 2, 3)) < 0.02
        assert abs(inverted.float().mean() - 0.2) < 0.04
        untouched = (colour - original).abs().amax((1, 2, 3)) < 0.02
        assert (inverted | untouched).all()


def test_blur_at_stl10_size_matches_the_pil_path():
    big = np.kron(colourful_image()[::8, ::8], np.ones((24, 24, 1))).astype(np.uint8)  # 96 x 96, sharp edges
    pil, batched = draw_both(big, D.ViewSpec(96, **WHOLE, jitter_p=0.0, gray_p=0.0, blur_p=1.0), n=400)
    sharpness = lambda v: (v[..., 1:] - v[..., :-1]).abs().amax((1, 2, 3))  # steepest edge; noqa: E731
    assert_same_distribution(sharpness(pil), sharpness(batched), 0.02)


def test_device_views_are_a_function_of_seed_epoch_and_images():
    images = torch.from_numpy(np.stack([colourful_image()] * 8)).permute(0, 3, 1, 2).contiguous()
    labels = torch.arange(8)
    specs = D.view_specs(32, (0.0, 0.0))
    batches = [[(0, i) for i in range(8)], [(1, i) for i in range(8)]]
    first = list(D.device_views(images, labels, specs, batches, 0, torch.contiguous_format))
    again = list(D.device_views(images, labels, specs, batches, 0, torch.contiguous_format))
    other_seed = list(D.device_views(images, labels, specs, batches, 1, torch.contiguous_format))
    assert all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))  # resumable
    assert not torch.equal(first[0][0], first[1][0])  # another epoch, other draws
    assert not torch.equal(first[0][0], other_seed[0][0])
    assert not torch.equal(first[0][0], first[0][1])  # the two views differ
    assert torch.equal(first[0][2], labels)


def test_every_image_draws_its_own_parameters():
    x = torch.from_numpy(coordinate_image()).permute(2, 0, 1)[None].expand(64, -1, -1, -1).contiguous()
    views = D.batched_view(x, D.ViewSpec(32), torch.Generator().manual_seed(0))
    assert len({tuple(v.flatten()[:50].tolist()) for v in views}) == 64


def test_training_on_the_device_path_is_deterministic(tmp_path, no_onednn):
    data = write_cifar10(tmp_path / "cifar", n_train_per_class=4, n_test_per_class=1)
    args = dataclasses.replace(B.PRESETS["isoloss"][1], dataset="cifar10", data_dir=str(data), augment_on="device",
                               width=0.0625, proj_hidden=32, proj_dim=16, batch_size=8, num_workers=0,
                               warmup_epochs=0, epochs=1, steps_per_epoch=3, log_every=1)
    a = B.train(dataclasses.replace(args, out_dir=str(tmp_path / "a")))
    b = B.train(dataclasses.replace(args, out_dir=str(tmp_path / "b")))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.predictor.C, torch.zeros_like(a.predictor.C))
