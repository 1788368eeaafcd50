"""Fig. 3 / Fig. 4-style PNGs from synthetic arrays (no model)."""
import matplotlib.image as mpimg
import numpy as np
import pytest

from label_reg import figures, metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _case(shift=3):
    rng = np.random.default_rng(0)
    image = rng.random((32, 28, 24)).astype(np.float32)
    fixed = np.zeros((32, 28, 24, 2), np.float32)
    fixed[8:20, 8:20, 6:18, 0] = 1
    fixed[12:14, 12:14, 10:12, 1] = 1
    moving = np.roll(fixed, shift, axis=0)
    return image, fixed, moving


def test_overlay_colours():
    image = np.zeros((4, 4))
    mr = np.zeros((4, 4), bool)
    us = np.zeros((4, 4), bool)
    mr[0, 0] = mr[1, 1] = True
    us[1, 1] = us[2, 2] = True
    rgb = figures.overlay_rgb(image, mr, us, alpha=1.0, outlines=False)
    np.testing.assert_allclose(rgb[0, 0], figures.MR_COLOUR)        # MR only: cyan
    np.testing.assert_allclose(rgb[2, 2], figures.TRUS_COLOUR)      # TRUS only: orange
    np.testing.assert_allclose(rgb[1, 1], figures.OVERLAP_COLOUR)   # both: yellow
    np.testing.assert_allclose(rgb[3, 3], 0.0)                      # neither: the (black) image


def test_middle_slice_of_the_gland():
    _, fixed, _ = _case()
    assert figures.middle_slice(fixed) == 11  # gland on z = 6..17
    assert figures.middle_slice(np.zeros((4, 4, 10))) == 5


def test_registration_figure_png(tmp_path):
    image, fixed, moving = _case()
    one = figures.registration_figure(tmp_path / "one.png", image, fixed, [("Pre-aligned", moving)])
    three = figures.registration_figure(tmp_path / "three.png", image, fixed,
                                        [("Pre-aligned", moving), ("A", fixed), ("B", moving)], title="case")
    for path in (one, three):
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0.01
    assert mpimg.imread(three).shape[1] > 2 * mpimg.imread(one).shape[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "three.png"]  # atomic: no temporaries left
    with pytest.raises(ValueError):
        figures.registration_figure(tmp_path / "bad.png", image, fixed, [("X", moving[:10])])
    assert not (tmp_path / "bad.png").exists()


def test_jacobian_map_and_figure(tmp_path):
    x = np.arange(32, dtype=np.float64)
    affine = np.zeros((32, 32, 32, 3))
    affine[..., 0] = 0.1 * x[:, None, None]
    np.testing.assert_allclose(figures.jacobian_gradient_map(affine), 0.0, atol=1e-12)
    wavy = np.zeros((32, 32, 32, 3))
    wavy[..., 0] = np.sin(x / 3.0)[:, None, None] * np.cos(x / 5.0)[None, :, None]
    grad = figures.jacobian_gradient_map(wavy)
    assert grad.shape == (32, 32, 32) and grad.max() > 0.01
    assert grad.mean() == pytest.approx(metrics.jacobian_gradient(wavy))

    mask = np.zeros((32, 32, 32))
    mask[8:20, 8:20, 8:20] = 1
    path = figures.jacobian_figure(tmp_path / "jac.png", [("A", wavy), ("B", 2 * wavy)], reference_mask=mask,
                                   title="case")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200 and img[..., :3].std() > 0.01
