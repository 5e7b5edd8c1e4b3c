"""NIQE, the Natural Image Quality Evaluator (Mittal, Soundararajan & Bovik, IEEE SPL 2013).

NIQE is "completely blind": it fits a multivariate Gaussian (MVG) to natural-scene-statistics
features of 96×96 blocks of an image and reports its distance to an MVG fitted once to pristine
natural images; lower is better. This is an independent numpy implementation of the authors'
MATLAB release, so that scores are comparable to the ones SR papers report:

* luma is the Y of MATLAB's ``rgb2ycbcr`` on the 8-bit image (rounded to integers, as MATLAB
  returns uint8 for uint8 input);
* the image is cropped to whole 96×96 blocks; the second scale is MATLAB's ``imresize(im, 0.5)``
  (bicubic with antialiasing), reimplemented here because no Python resampler matches it;
* features are the AGGD/GGD fits of the MSCN coefficients and of their four neighbour products
  (18 per scale, 36 per block), estimated by the release's moment-matching grid search;
* blocks whose features are undefined (NaN, e.g. a perfectly flat block) are handled as the
  release's ``nanmean``/``nancov`` do. Where fewer than two blocks have defined features (a flat
  image), the release gives NaN; here such an image gets a finite, poor score (about 30.3 for any
  constant image), so an evaluation can still average it.

Images with fewer than two 96×96 blocks raise ImageTooSmall: NIQE's covariance needs two.

The pristine model (``niqe_pris_params.npz``: MVG mean and covariance, and the 7×7 Gaussian window)
is data converted from the MATLAB release and used under the Apache License 2.0; the licence ships
next to it as ``LICENSE-niqe_pris_params-Apache-2.0.txt``.
"""

from __future__ import annotations

import math
from functools import cache
from importlib import resources

import numpy as np
from PIL import Image

BLOCK = 96
FLAT_TOL = 1e-6  # grey levels; see _mscn
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
# Grid of the GGD shape parameter searched by the release (0.2:0.001:10) and the functions of it
# that the moment matching needs, tabulated once because alpha is always a grid point.
_ALPHA = 0.2 + 0.001 * np.arange(9801)
_G1, _G2, _G3 = (np.array([math.gamma(k / a) for a in _ALPHA]) for k in (1, 2, 3))
_RHO = _G2**2 / (_G1 * _G3)  # E[|x|]^2 / E[x^2] of a GGD; strictly increasing in alpha
_BETA_SCALE = np.sqrt(_G1 / _G3)  # std -> GGD scale
_MEAN_SCALE = _G2 / _G1  # AGGD mean = (beta_r - beta_l) * this


class ImageTooSmall(ValueError):
    """The image holds fewer than two 96×96 blocks, too few to fit NIQE's covariance."""


@cache
def _pristine() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, cov, 1-D Gaussian taps) of the pristine model, read from the package data."""
    with resources.files(__package__).joinpath("niqe_pris_params.npz").open("rb") as f:
        params = np.load(f)
        mu, cov, window = params["mu_pris_param"][0], params["cov_pris_param"], params["gaussian_window"]
    # The window is separable (an outer product of normalised 1-D taps), so its row sums are the taps.
    return mu, cov, window.sum(axis=1)


def _luma(image: np.ndarray | Image.Image) -> np.ndarray:
    """Rounded MATLAB Y (float64, 16..235) of an RGB or greyscale uint8 image or a PIL image.

    Greyscale counts as R = G = B, so it scores exactly as its RGB copy does.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"NIQE needs an 8-bit image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None].repeat(3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"NIQE needs an H×W×3 RGB or H×W greyscale image, got shape {image.shape}")
    return np.floor(16.0 + image @ _Y_WEIGHTS + 0.5)


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's bicubic kernel (a = -0.5)."""
    x = np.abs(x)
    return np.where(x <= 1, 1.5 * x**3 - 2.5 * x**2 + 1,
                    np.where(x <= 2, -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2, 0.0))


def _resize_weights(n_in: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Taps of MATLAB's ``imresize`` along one axis for a downscale with antialiasing.

    Returns (indices, weights), both (n_out, taps): output i = sum_k weights[i, k] * input[indices[i, k]],
    with MATLAB's symmetric padding folded into the indices.
    """
    n_out = math.ceil(n_in * scale)
    width = 4.0 / scale  # the cubic kernel stretched by 1/scale: that is the antialiasing
    centre = np.arange(1, n_out + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinate
    first = np.floor(centre - width / 2)
    idx = first[:, None] + np.arange(math.ceil(width) + 2)
    weights = scale * _cubic(scale * (centre[:, None] - idx))
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in)[::-1]])
    return mirror[(idx.astype(np.int64) - 1) % (2 * n_in)], weights


def _imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased) of a 2-D float image, rows first."""
    idx, w = _resize_weights(img.shape[0], 0.5)
    img = np.einsum("ok,okw->ow", w, img[idx])
    idx, w = _resize_weights(img.shape[1], 0.5)
    return np.einsum("ok,hok->ho", w, img[:, idx])


def _blur(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation with edge replication (MATLAB ``imfilter(..., 'replicate')``)."""
    r = len(taps) // 2
    padded = np.pad(img, r, mode="edge")
    h, w = img.shape
    rows = sum(t * padded[k:k + h] for k, t in enumerate(taps))
    return sum(t * rows[:, k:k + w] for k, t in enumerate(taps))


def _mscn(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (the +1 keeps flat regions finite).

    In a locally constant region img - mu should be 0, but the blur's rounding leaves noise of
    ~1e-14 whose random signs would enter the AGGD fits, which count negative and positive values
    separately. Deviations below FLAT_TOL grey levels are indistinguishable from such noise and are
    set to exactly 0; the reference scores are matched only so (CSet5/head differs by 0.3 otherwise).
    """
    mu = _blur(img, taps)
    sigma = np.sqrt(np.abs(_blur(img * img, taps) - mu * mu))
    centred = img - mu
    centred[np.abs(centred) < FLAT_TOL] = 0.0
    return centred / (sigma + 1)


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric generalised Gaussian fit of each row of x: (alpha's grid index, beta_left, beta_right).

    Moment matching as in the release's ``estimateaggdparam``: the shape is the grid point whose
    GGD moment ratio is nearest. A row without negative or positive values has no defined fit:
    its betas are NaN and its alpha the first grid point, as MATLAB's ``min`` over NaN gives.
    """
    sq = x * x
    neg, pos = x < 0, x > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt((sq * neg).sum(axis=1) / neg.sum(axis=1))
        right = np.sqrt((sq * pos).sum(axis=1) / pos.sum(axis=1))
        g = left / right
        rhat = np.abs(x).mean(axis=1) ** 2 / sq.mean(axis=1)
        target = rhat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    # _RHO is increasing, so the nearest grid point is one of the two around the insertion point;
    # ties go to the lower index, as MATLAB's min does.
    hi = np.clip(np.searchsorted(_RHO, target), 1, len(_RHO) - 1)
    i = np.where((_RHO[hi] - target) ** 2 < (_RHO[hi - 1] - target) ** 2, hi, hi - 1)
    i = np.where(np.isnan(target), 0, i)
    return i, left * _BETA_SCALE[i], right * _BETA_SCALE[i]


def _block_features(mscn: np.ndarray, size: int) -> np.ndarray:
    """The 18 features of every size×size block of an MSCN map (blocks in row-major order)."""
    nh, nw = mscn.shape[0] // size, mscn.shape[1] // size
    blocks = mscn.reshape(nh, size, nw, size).transpose(0, 2, 1, 3).reshape(nh * nw, size, size)
    i, left, right = _aggd(blocks.reshape(len(blocks), -1))
    feats = [_ALPHA[i], (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):  # horizontal, vertical, both diagonals
        pair = blocks * np.roll(blocks, shift, axis=(1, 2))  # cyclic within the block, as circshift
        i, left, right = _aggd(pair.reshape(len(blocks), -1))
        feats += [_ALPHA[i], (right - left) * _MEAN_SCALE[i], left, right]
    return np.stack(feats, axis=1)


def niqe(image: np.ndarray | Image.Image, crop_border: int = 0) -> float:
    """NIQE score of an RGB (H×W×3) or greyscale (H×W) uint8 array or a PIL image; lower is better.

    ``crop_border`` pixels are removed from every side first (SR evaluation convention). Raises
    ImageTooSmall when fewer than two whole 96×96 blocks remain.
    """
    y = _luma(image)
    if crop_border > 0:
        y = y[crop_border:-crop_border, crop_border:-crop_border]
    nh, nw = y.shape[0] // BLOCK, y.shape[1] // BLOCK
    if nh * nw < 2:
        raise ImageTooSmall(
            f"NIQE needs at least two {BLOCK}×{BLOCK} blocks (e.g. {BLOCK}×{2 * BLOCK} or "
            f"{2 * BLOCK}×{BLOCK} pixels), got {y.shape[0]}×{y.shape[1]}"
            f" after a border crop of {crop_border}")
    mu_p, cov_p, taps = _pristine()
    y = y[:nh * BLOCK, :nw * BLOCK]
    feats = np.hstack([_block_features(_mscn(y, taps), BLOCK),
                       _block_features(_mscn(_imresize_half(y), taps), BLOCK // 2)])
    complete = ~np.isnan(feats).any(axis=1)
    if complete.sum() < 2:
        # Too few blocks with any structure to fit (e.g. a flat image), where the release returns
        # NaN. Use the fits' degenerate limit instead, a distribution shrunk to a point (betas and
        # means 0, alpha at the grid's lower end), so such an image scores as very unnatural.
        feats, complete = np.nan_to_num(feats, nan=0.0), np.ones_like(complete)
    mu_d = np.nanmean(feats, axis=0)  # with cov over complete blocks only: nanmean/nancov
    cov_d = np.cov(feats[complete], rowvar=False)
    d = mu_p - mu_d
    return math.sqrt(max(float(d @ np.linalg.pinv((cov_p + cov_d) / 2, hermitian=True) @ d), 0.0))
