"""Overlays of anomaly maps and ground truth for inspection; nothing here affects a number.

Images are RGB uint8 [H, W, 3] throughout and are written with PIL, so there is no BGR swap
(AA-CLIP's `forward_utils.py::visualize` passes an RGB array to `cv2.imwrite`, which swaps red
and blue).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from utils.core.checkpoint import atomic_write

logger = logging.getLogger(__name__)

# Turbo (Google, 2019) through its published 5th-degree polynomial fit (A. Mikhailov):
# channel(x) = sum_i c_i x^i for i = 0..5, clipped to [0, 1].
_TURBO_COEFFICIENTS = np.array(
    [
        [0.13572138, 0.09140261, 0.10667330],
        [4.61539260, 2.19418839, 12.64194608],
        [-42.66032258, 4.84296658, -60.58204836],
        [132.13108234, -14.18503333, 110.36276771],
        [-152.94239396, 4.27729857, -89.90310912],
        [59.28637943, 2.82956604, 27.34824973],
    ]
)


def _turbo_lut() -> np.ndarray:
    """-> [256, 3] uint8 turbo colours for x = 0, 1/255, ..., 1."""
    x = np.linspace(0.0, 1.0, 256)
    powers = x[:, None] ** np.arange(6)  # [256, 6]
    return np.round(255 * np.clip(powers @ _TURBO_COEFFICIENTS, 0.0, 1.0)).astype(np.uint8)


TURBO_LUT = _turbo_lut()
_GT_COLOR = np.array([255, 0, 0], dtype=np.float32)  # tint of the defect region
_CONTOUR_COLOR = np.array([255, 255, 0], dtype=np.uint8)


def apply_colormap(heat: np.ndarray) -> np.ndarray:
    """heat: [H, W] float in [0, 1] (clipped, NaN -> 0) -> [H, W, 3] uint8 turbo colours."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    return TURBO_LUT[np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.intp)]


def _blend(image_rgb: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    mixed = (1 - alpha) * image_rgb.astype(np.float32) + alpha * colour
    return np.round(mixed).clip(0, 255).astype(np.uint8)


def overlay(
    image_rgb: np.ndarray,
    heat: np.ndarray,
    alpha: float = 0.5,
    valid_mask: np.ndarray | None = None,
) -> np.ndarray:
    """image_rgb: [H, W, 3] uint8; heat: [H, W] in [0, 1]; valid_mask: [H, W] bool -> [H, W, 3].

    Pixels outside `valid_mask` keep the image.
    """
    blended = _blend(image_rgb, apply_colormap(heat), alpha)
    if valid_mask is not None:
        blended = np.where(np.asarray(valid_mask, dtype=bool)[..., None], blended, image_rgb)
    return blended


def mask_overlay(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """image_rgb: [H, W, 3] uint8; mask: [H, W] bool -> the image, defects tinted and outlined."""
    mask = np.asarray(mask, dtype=bool)
    out = np.where(mask[..., None], _blend(image_rgb, _GT_COLOR, alpha), image_rgb)
    contour = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))
    out[contour] = _CONTOUR_COLOR
    return out


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """array: [h, w] -> [H, W] for size (H, W)."""
    if array.shape == size:
        return array
    if array.dtype == bool:
        resized = Image.fromarray(array.astype(np.uint8) * 255).resize(size[::-1], resample)
        return np.asarray(resized) > 127
    resized = Image.fromarray(array.astype(np.float32)).resize(size[::-1], resample)
    return np.asarray(resized)


def save_panels(
    path: Path,
    image_rgb: np.ndarray,
    heat: np.ndarray,
    mask: np.ndarray | None = None,
    valid_mask: np.ndarray | None = None,
) -> Path:
    """Write one PNG `[image | ground truth | heat overlay]` (ground truth only with a mask).

    image_rgb: [H, W, 3] uint8; heat: [h, w] in [0, 1], resized bilinearly to [H, W];
    mask, valid_mask: [h, w] bool, resized nearest.
    """
    image_rgb = np.asarray(image_rgb, dtype=np.uint8)
    size = image_rgb.shape[:2]
    heat = _resize(np.asarray(heat, dtype=np.float32), size, Image.Resampling.BILINEAR)
    if valid_mask is not None:
        valid_mask = _resize(np.asarray(valid_mask, bool), size, Image.Resampling.NEAREST)
    panels = [image_rgb]
    if mask is not None:
        mask = _resize(np.asarray(mask, bool), size, Image.Resampling.NEAREST)
        panels.append(mask_overlay(image_rgb, mask))
    panels.append(overlay(image_rgb, heat, valid_mask=valid_mask))
    panel_image = Image.fromarray(np.concatenate(panels, axis=1))
    path = Path(path)
    atomic_write(path, lambda file: panel_image.save(file, format="PNG"))
    return path
