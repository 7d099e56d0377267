"""Folders of field images: listing, robust loading, letterbox with a valid-pixel mask (spec
feclip.md §14.1; predict.py).

Loading decisions:
* grayscale, palette, CMYK, ... become RGB through PIL; the EXIF orientation is applied, so maps
  and overlays match what an image viewer shows;
* 16-bit grayscale (`I;16*`, and `I` as PNG's 16-bit loads) is scaled to 8 bit by `v * 255 / 65535`
  (rounded), not clipped at 255 as PIL's `convert("L")` does;
* transparency (RGBA, LA, palette with a transparent colour) is composited over the pad colour,
  so transparent pixels look like letterbox padding rather than the arbitrary RGB they hold;
* an unreadable file becomes an error string for that file (`FieldImage.error`), never an
  exception, so one corrupt file cannot stop a run.

`letterbox` keeps the aspect ratio (`scale = S / max(H, W)`, bicubic, pasted centred on a canvas of
the pad colour) and returns the valid-pixel mask and the geometry that maps a map back to the
original image; `resize` is the training preprocessing (square, aspect not kept, all valid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from datasets.anomaly import CLIP_MEAN, CLIP_STD
from datasets.metadata import IMAGE_EXTENSIONS
from utils.core.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_PAD_COLOR = (255, 255, 255)  # the seed's field data is padded white
# The data set builders' extensions plus two common in the field; matched case-insensitively.
FIELD_EXTENSIONS = tuple(dict.fromkeys((*IMAGE_EXTENSIONS, ".tiff", ".webp")))
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_READ_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class Geometry:
    """Where the original image (height x width) lies on the S x S network input: the content
    rectangle rows `top:top+content_height`, columns `left:left+content_width`."""

    height: int
    width: int
    size: int
    top: int
    left: int
    content_height: int
    content_width: int

    def valid_mask(self) -> torch.Tensor:
        """-> [S, S] bool, True inside the content rectangle."""
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        mask[
            self.top : self.top + self.content_height, self.left : self.left + self.content_width
        ] = True
        return mask

    def to_original(self, anomaly_map: np.ndarray) -> np.ndarray:
        """anomaly_map: [S, S] -> [H, W]: crop the content rectangle, resize bilinearly."""
        content = np.asarray(anomaly_map, dtype=np.float32)[
            self.top : self.top + self.content_height, self.left : self.left + self.content_width
        ]
        resized = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(content))[None, None],
            size=(self.height, self.width),
            mode="bilinear",
            align_corners=False,
        )
        return resized[0, 0].numpy()


def list_images(folder: Path | str) -> list[Path]:
    """Image files under `folder` (recursive, sorted, FIELD_EXTENSIONS in any case).

    Raises DataError when the folder is missing or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a folder of images")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in FIELD_EXTENSIONS
    )
    if not files:
        extensions = ", ".join(FIELD_EXTENSIONS)
        raise DataError(f"{folder} holds no images ({extensions}); check the folder")
    return files


def _to_8bit_rgb(image: Image.Image, pad_color: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB (16-bit scaled, transparency composited over `pad_color`)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.round(np.clip(values, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(pad_color) + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy


def read_image(
    path: Path | str, pad_color: tuple[int, int, int] = DEFAULT_PAD_COLOR
) -> Image.Image:
    """Read any supported image as 8-bit RGB; an unreadable file raises DataError."""
    try:
        with Image.open(path) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no rotation
            return _to_8bit_rgb(image, pad_color)
    except _READ_ERRORS as error:
        raise DataError(f"cannot read image {path}: {error}") from error


def _normalize(image: Image.Image) -> torch.Tensor:
    """PIL RGB S x S -> [3, S, S] CLIP-normalised."""
    return transforms.functional.normalize(
        transforms.functional.to_tensor(image), CLIP_MEAN, CLIP_STD
    )


def resize(image: Image.Image, size: int) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    """Training preprocessing: bicubic S x S (aspect not kept) -> ([3, S, S], [S, S] all True,
    geometry)."""
    width, height = image.size
    tensor = _normalize(image.resize((size, size), Image.Resampling.BICUBIC))
    geometry = Geometry(height, width, size, 0, 0, size, size)
    return tensor, geometry.valid_mask(), geometry


def letterbox(
    image: Image.Image, size: int, pad_color: tuple[int, int, int] = DEFAULT_PAD_COLOR
) -> tuple[torch.Tensor, torch.Tensor, Geometry]:
    """Keep the aspect ratio: bicubic resize by `S / max(H, W)`, paste centred on an S x S canvas
    of `pad_color`, CLIP-normalise -> ([3, S, S], valid mask [S, S] bool, geometry)."""
    width, height = image.size
    scale = size / max(height, width)
    content_width = min(size, max(1, round(width * scale)))
    content_height = min(size, max(1, round(height * scale)))
    top, left = (size - content_height) // 2, (size - content_width) // 2
    canvas = Image.new("RGB", (size, size), tuple(pad_color))
    canvas.paste(
        image.resize((content_width, content_height), Image.Resampling.BICUBIC), (left, top)
    )
    geometry = Geometry(height, width, size, top, left, content_height, content_width)
    return _normalize(canvas), geometry.valid_mask(), geometry


@dataclass
class FieldImage:
    """One loaded file: network input, valid mask, geometry, or the error that stopped it."""

    file: str
    image: torch.Tensor | None = None  # [3, S, S]
    valid_mask: torch.Tensor | None = None  # [S, S] bool
    geometry: Geometry | None = None
    original: np.ndarray | None = None  # [H, W, 3] uint8 when kept for overlays
    error: str = ""


class ImageFolder(Dataset):
    """Files of a folder -> FieldImage items (errors as items, never raised).

    `file` is the path relative to `root` in POSIX form (the key of scores.csv and labels.csv).
    """

    def __init__(
        self,
        root: Path | str,
        img_size: int,
        use_letterbox: bool = False,
        pad_color: tuple[int, int, int] = DEFAULT_PAD_COLOR,
        keep_original: bool = False,
        files: list[Path] | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = list_images(self.root) if files is None else files
        self.img_size = img_size
        self.use_letterbox = use_letterbox
        self.pad_color = tuple(pad_color)
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.files)

    def relative_name(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> FieldImage:
        item = FieldImage(self.relative_name(index))
        try:
            rgb = read_image(self.files[index], self.pad_color)
        except DataError as error:
            item.error = str(error)
            return item
        if self.use_letterbox:
            item.image, item.valid_mask, item.geometry = letterbox(
                rgb, self.img_size, self.pad_color
            )
        else:
            item.image, item.valid_mask, item.geometry = resize(rgb, self.img_size)
        if self.keep_original:
            item.original = np.asarray(rgb, dtype=np.uint8)
        return item


def collate(items: list[FieldImage]) -> list[FieldImage]:
    """DataLoader collate: keep the list (images of different sizes, errors)."""
    return items
