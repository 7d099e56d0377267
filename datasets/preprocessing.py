"""One preprocessing for every path: a decoded image becomes the model's input, its valid-pixel
mask and the geometry that maps a map back to the image; a mask becomes the pixel target.

Training, test.py, predict.py, the export's model.json and the exported predictor all use one
`Preprocessing` (the model's own, `ClipConfig.preprocessing`), so a checkpoint sees the same
pixels on every path.

Reading (`read_image`): any PIL mode becomes 8-bit RGB. 16-bit grayscale (`I;16*`, and `I` as
PNG's 16-bit loads) is scaled by `v * 255 / 65535` (rounded) instead of clipped at 255 as PIL's
`convert` does; transparency is composited over the pad colour; the EXIF orientation is applied,
so maps match what an image viewer shows. An unreadable file raises DataError.

Large images (`read_image`'s `max_pixels`, the `--max_image_pixels` budget of predict.py): the
size is read from the header before anything is decoded. A JPEG over the budget is decoded
reduced by 1/2, 1/4 or 1/8 in the decoder (`Image.draft`) to within it; any other image over
the budget is a DataError naming the flag (decoding it whole is what the budget forbids).
`reduce_above` (predict.py's whole-image scoring) bounds the memory of an image within the
budget: one of more pixels is reduced by the smallest integer factor that brings it under
(`Image.reduce`, a box filter, in its own mode before the RGB conversion), which leaves at least
a quarter of `reduce_above` pixels, several times any model input: PIL finds such a two-step
resize (`reducing_gap` 3) nearly indistinguishable from a direct one.

Geometries (`geometry`), each computing what its original computes:
* `square`: bicubic to S x S, the aspect ratio not kept (AA-CLIP, SOWA);
* `short_side_crop`: bicubic short side to S, then the centre S x S (CLIP's, the FE-CLIP fork's);
* `letterbox`: bicubic by `S / max(H, W)`, pasted centred on an S x S canvas of the pad colour;
  the valid mask is False on the padding (field images).

Resize backends (`backend`), the other half of "to the pixel":
* `pil`: the 8-bit PIL image is resized and masks by PIL (AA-CLIP's and SOWA's transforms; PIL's
  nearest samples pixel centres);
* `torch`: the image as float32 in [0, 1] is resized by torchvision (bicubic, antialiased, not
  clamped) and masks by torch's nearest, which floors the source index: the FE-CLIP fork reads
  images as float tensors and runs torchvision v2 `Resize(S)` + `CenterCrop(S)` on them. The two
  differ by about one grey level on average (0.066 at hard edges after normalisation) and by a
  pixel at mask edges.

Masks are made binary first (any non-zero pixel is defect, as every original does), resized in
the same geometry (nearest or bilinear), and thresholded: defect where the resized value in
[0, 1] is above `mask_threshold`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2

from utils.core.config import RUN, setting
from utils.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PAD_COLOR = (255, 255, 255)  # the seed's field data is padded white
GEOMETRIES = ("square", "short_side_crop", "letterbox")
BACKENDS = ("pil", "torch")
MASK_RESIZES = ("nearest", "bilinear")
_PIL_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
}
_TORCH_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,  # F.interpolate "nearest": the index floors
    "bilinear": InterpolationMode.BILINEAR,
}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Above the 5-50 MP of common industrial cameras, far below PIL's own bomb limit (179 MP)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DRAFT_SCALES = (1, 2, 4, 8)  # the JPEG decoder's reductions (Image.draft)
_READ_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class ReadConfig:
    """How large an image predict.py calibrate and score decode."""

    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS,
        "pixel budget of one image, read from its header before decoding: a larger JPEG is "
        "decoded reduced (1/2, 1/4, 1/8) to within it, any other larger file is refused (score: "
        "an error row; calibrate: skipped); "
        "the default is above common industrial cameras' 5-50 MP and far below PIL's 179 MP "
        "bomb limit. Whole-image scoring holds at most a reduced copy; with --tile the whole "
        "image and its full-resolution map are held, and this budget is what bounds them",
        kind=RUN,
        minimum=1,
    )


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale -> L by `v * 255 / 65535` rounded (integer arithmetic: never exactly
    half, so it equals numpy's rounding), values clipped to 0-65535 first."""
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    values *= 255
    values += 32767
    values //= 65535
    return Image.fromarray(values.astype(np.uint8), mode="L")


def _to_8bit_rgb(image: Image.Image, pad_color: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB (16-bit scaled, transparency composited over `pad_color`)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(pad_color) + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy


def _over_budget(path: Path | str, width: int, height: int, max_pixels: int) -> DataError:
    return DataError(
        f"{path} declares {width} x {height} pixels ({width * height / 1e6:.0f} MP), over the "
        f"pixel budget of {max_pixels / 1e6:g} MP (--max_image_pixels); raise it if your camera "
        "makes such images"
    )


def _draft(image: Image.Image, path: Path | str, limit: int) -> None:
    """A JPEG of more than `limit` pixels: let the decoder reduce it by the smallest of 1/2,
    1/4, 1/8 that brings it under (the largest when none does)."""
    width, height = image.size
    scale = next(
        (s for s in DRAFT_SCALES if math.ceil(width / s) * math.ceil(height / s) <= limit),
        DRAFT_SCALES[-1],
    )
    image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))
    logger.info(
        "%s: %d x %d pixels decoded at 1/%d (%d x %d) to stay within %g MP",
        path, width, height, scale, *image.size, limit / 1e6,
    )  # fmt: skip


def _reduced(image: Image.Image, limit: int) -> Image.Image:
    """`image` reduced by the smallest integer factor that leaves at most `limit` pixels, in a
    mode `Image.reduce` takes (16-bit scaled to L, 1-bit to L, palette expanded)."""
    width, height = image.size
    factor = max(2, math.ceil(math.sqrt(width * height / limit)))
    while math.ceil(width / factor) * math.ceil(height / factor) > limit:
        factor += 1
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image.reduce(factor)


def read_image(
    path: Path | str,
    pad_color: tuple[int, int, int] = DEFAULT_PAD_COLOR,
    max_pixels: int | None = None,
    reduce_above: int | None = None,
) -> Image.Image:
    """Read any supported image as 8-bit RGB; an unreadable file raises DataError.

    max_pixels: the pixel budget, checked on the header (a JPEG is decoded reduced to within
    it, another image over it raises DataError); reduce_above: an image of more pixels is
    reduced by an integer factor to at most that many before its RGB conversion (see the module
    docstring). None: no limit. PIL's bomb error (above 179 MP) applies either way; its warning
    (above 89 MP) is left out under a budget, which is the check then.
    """
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels and image.format != "JPEG":
                raise _over_budget(path, width, height, max_pixels)
            limit = min(max_pixels or math.inf, reduce_above or math.inf)
            if image.format == "JPEG" and width * height > limit:
                _draft(image, path, int(limit))
                if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
                    raise _over_budget(path, width, height, max_pixels)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no rotation
            if reduce_above is not None and image.size[0] * image.size[1] > reduce_above:
                image = _reduced(image, reduce_above)
            return _to_8bit_rgb(image, pad_color)
    except FileNotFoundError as error:
        raise DataError(
            f"cannot read image {path}: it is gone (deleted or moved since it was listed); put "
            "it back or leave it out"
        ) from error
    except _READ_ERRORS as error:
        raise DataError(f"cannot read image {path}: {error}; remove or replace the file") from error


def read_mask(path: Path | str) -> Image.Image:
    """Read a mask as an 8-bit single-channel image; an unreadable file raises DataError."""
    try:
        with Image.open(path) as mask:
            return mask.convert("L")
    except _READ_ERRORS as error:
        raise DataError(f"cannot read mask {path}: {error}; remove or replace the file") from error


# ---------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Geometry:
    """Where an image of `height` x `width` lies on the S x S input: the content rectangle (rows
    `top:top+content_height`, columns `left:left+content_width`) shows the image's region
    `crop` = (left, top, right, bottom) in its own pixels (all of it, except for
    `short_side_crop`)."""

    height: int
    width: int
    size: int
    top: int
    left: int
    content_height: int
    content_width: int
    crop: tuple[int, int, int, int]

    @classmethod
    def native(cls, width: int, height: int) -> Geometry:
        """A map already at the image's own resolution `[H, W]` (tiled inference): its content
        is all of it (`size` is the longer side)."""
        return cls(height, width, max(height, width), 0, 0, height, width, (0, 0, width, height))

    def resized(self, width: int, height: int) -> Geometry:
        """The same placement for a copy of the image resized to `width` x `height` (a
        preview): `crop` scaled to it."""
        x, y = width / self.width, height / self.height
        left, top, right, bottom = self.crop
        crop = (round(left * x), round(top * y), round(right * x), round(bottom * y))
        crop = (*crop[:2], max(crop[2], crop[0] + 1), max(crop[3], crop[1] + 1))
        return dataclasses.replace(self, height=height, width=width, crop=crop)

    def valid_mask(self) -> torch.Tensor:
        """-> [S, S] bool, True inside the content rectangle."""
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        mask[
            self.top : self.top + self.content_height, self.left : self.left + self.content_width
        ] = True
        return mask

    def to_original(self, anomaly_map: np.ndarray) -> np.ndarray:
        """anomaly_map `[S, S]` -> the map over the image region the model saw (`crop`,
        `[h, w]`): the content rectangle resized bilinearly."""
        content = np.asarray(anomaly_map, dtype=np.float32)[
            self.top : self.top + self.content_height, self.left : self.left + self.content_width
        ]
        left, top, right, bottom = self.crop
        resized = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(content))[None, None],
            size=(bottom - top, right - left),
            mode="bilinear",
            align_corners=False,
        )
        return resized[0, 0].numpy()

    def to_image(self, anomaly_map: np.ndarray) -> np.ndarray:
        """anomaly_map `[S, S]` -> `[H, W]` at the image's full resolution: the seen region as
        `to_original` gives it; pixels the model never saw (outside `short_side_crop`'s centre
        square) take the map's minimum, so no threshold flags them."""
        seen = self.to_original(anomaly_map)
        if seen.shape == (self.height, self.width):
            return seen
        left, top, right, bottom = self.crop
        full = np.full((self.height, self.width), seen.min(), dtype=np.float32)
        full[top:bottom, left:right] = seen
        return full


class Prepared(NamedTuple):
    """One image as the model takes it."""

    image: torch.Tensor  # [3, S, S] float32, normalised
    valid_mask: torch.Tensor  # [S, S] bool, False on letterbox padding
    geometry: Geometry


# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How images and masks become a model's inputs (see the module docstring).

    size: the input side S. geometry: square | short_side_crop | letterbox. backend: pil | torch.
    pad_color: letterbox canvas and the colour transparency is composited over.
    mask_resize: nearest (AA-CLIP, FE-CLIP) or bilinear (SOWA: grey edges).
    mask_threshold: a pixel is defect where the resized mask, in [0, 1], is above it (AA-CLIP 0,
        i.e. any non-zero pixel; SOWA 0 for training and 0.5 for testing).
    resize_masks: a mask whose size differs from its image is resized to the input like the
        image, as the original code does without a check (`--resize_masks`); off, it is an error.
    mean, std: the normalisation (CLIP's); interpolation: of images (bicubic).
    """

    size: int
    geometry: str = "square"
    backend: str = "pil"
    pad_color: tuple[int, int, int] = DEFAULT_PAD_COLOR
    mask_resize: str = "nearest"
    mask_threshold: float = 0.0
    resize_masks: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        checks = (
            ("geometry", GEOMETRIES),
            ("backend", BACKENDS),
            ("mask_resize", MASK_RESIZES),
            ("interpolation", tuple(_PIL_RESAMPLE)),
        )
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                value = getattr(self, name)
                raise ConfigError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"input size {self.size!r} must be a positive integer")
        colour = tuple(self.pad_color)
        if len(colour) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in colour):
            raise ConfigError(f"pad colour {list(colour)} must be three integers in 0-255")
        for name in ("mean", "std"):
            values = tuple(getattr(self, name))
            if len(values) != 3 or not all(isinstance(v, int | float) for v in values):
                raise ConfigError(f"{name} {list(values)} must be three numbers")
        if not all(value > 0 for value in self.std):
            raise ConfigError(f"std {list(self.std)} must be positive")
        object.__setattr__(self, "pad_color", colour)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def pads(self) -> bool:
        """Whether inputs carry padding a model must leave out (letterbox): their valid masks
        go to the model and to the metrics."""
        return self.geometry == "letterbox"

    # -----------------------------------------------------------------------------------------
    # Records (model.json, calibrations, results)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values: what an exported graph's runtime must apply."""
        return {
            field.name: list(value) if isinstance(value, tuple) else value
            for field in dataclasses.fields(self)
            for value in [getattr(self, field.name)]
        }

    @classmethod
    def from_dict(cls, values: Any, source: str = "the record") -> Preprocessing:
        """The preprocessing a `to_dict` record describes: every field present, nothing else,
        each checked; otherwise a ConfigError naming `source`."""
        names = [field.name for field in dataclasses.fields(cls)]
        if not isinstance(values, dict) or set(values) != set(names):
            keys = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise ConfigError(
                f"{source} describes its preprocessing with {keys}, not {sorted(names)}; write "
                "it again with this version"
            )
        try:
            return cls(**{name: _from_json(values[name]) for name in names})
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None

    # -----------------------------------------------------------------------------------------
    # Images

    def geometry_of(self, width: int, height: int) -> Geometry:
        """Where an image of `width` x `height` lands on the input."""
        size = self.size
        full = (0, 0, width, height)
        if self.geometry == "square":
            return Geometry(height, width, size, 0, 0, size, size, full)
        if self.geometry == "short_side_crop":
            side = min(width, height)
            left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
            return Geometry(
                height, width, size, 0, 0, size, size, (left, top, left + side, top + side)
            )
        scale = size / max(height, width)
        content_width = min(size, max(1, round(width * scale)))
        content_height = min(size, max(1, round(height * scale)))
        top, left = (size - content_height) // 2, (size - content_width) // 2
        return Geometry(height, width, size, top, left, content_height, content_width, full)

    def __call__(self, image: Image.Image) -> Prepared:
        """An RGB image -> its normalised input `[3, S, S]`, valid mask `[S, S]`, geometry."""
        geometry = self.geometry_of(*image.size)
        pixels = self.pixels(image, geometry)
        normalised = TF.normalize(pixels, list(self.mean), list(self.std))
        return Prepared(normalised, geometry.valid_mask(), geometry)

    def load(self, path: Path | str) -> Prepared:
        """Read an image file (`read_image`) and prepare it."""
        return self(read_image(path, self.pad_color))

    def pixels(self, image: Image.Image, geometry: Geometry | None = None) -> torch.Tensor:
        """The input before normalisation: `[3, S, S]` float32 in about [0, 1]."""
        geometry = geometry or self.geometry_of(*image.size)
        if self.backend == "pil":
            canvas = self._place_pil(image, geometry, _PIL_RESAMPLE[self.interpolation])
            return TF.to_tensor(canvas)
        # [3, H, W] in [0, 1], converted as the fork's anomalib reads images
        tensor = TF2.to_dtype(TF2.to_image(image), torch.float32, scale=True)
        tensor = tensor.as_subclass(torch.Tensor)
        fill = [value / 255.0 for value in self.pad_color]
        return self._place_tensor(tensor, geometry, self.interpolation, fill)

    def seen_region(self, image: Image.Image) -> Image.Image:
        """The part of an image the model sees, at the image's own resolution."""
        geometry = self.geometry_of(*image.size)
        return image if geometry.crop == (0, 0, *image.size) else image.crop(geometry.crop)

    def to_pixels(self, images: torch.Tensor) -> np.ndarray:
        """Normalised inputs `[B, 3, S, S]` back to 8-bit pixels `[B, S, S, 3]` (exact for the
        pil backend: the rounding error is far below half a grey level)."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        pixels = ((images.detach().cpu().float() * std + mean) * 255).round().clamp(0, 255)
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()

    # -----------------------------------------------------------------------------------------
    # Masks

    def mask(self, mask: Image.Image | None, image_size: tuple[int, int]) -> torch.Tensor:
        """A mask (L image, or None: no defect) of an image of `image_size` (width, height) ->
        `[1, S, S]` float in {0, 1}, on the image's geometry."""
        if mask is None:
            return torch.zeros(1, self.size, self.size)
        self._check_mask_size(mask, image_size)
        # Each geometry resizes a mask of another size (--resize_masks) onto its image's place.
        geometry = self.geometry_of(*image_size)
        binary = mask.point(lambda value: 255 if value else 0)
        if self.backend == "pil":
            canvas = self._place_pil(binary, geometry, _PIL_RESAMPLE[self.mask_resize])
            resized = TF.to_tensor(canvas)
        else:
            tensor = TF.to_tensor(binary)  # [1, H, W] in {0, 1}
            resized = self._place_tensor(tensor, geometry, self.mask_resize, [0.0])
        return (resized > self.mask_threshold).float()

    def load_mask(self, path: Path | str | None, image_size: tuple[int, int]) -> torch.Tensor:
        """`mask` of a mask file (None or empty: no defect)."""
        if not path:
            return self.mask(None, image_size)
        try:
            return self.mask(read_mask(path), image_size)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None

    def native_mask(self, mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
        """A mask at its image's own resolution (tiles, training crops): binary L (0 or 255);
        one of another size is resized to the image with `mask_resize` and thresholded as in
        `mask` (`resize_masks`), or refused."""
        self._check_mask_size(mask, image_size)
        binary = mask.point(lambda value: 255 if value else 0)
        if binary.size == tuple(image_size):
            return binary
        resized = binary.resize(tuple(image_size), _PIL_RESAMPLE[self.mask_resize])
        cut = self.mask_threshold * 255
        return resized.point(lambda value: 255 if value > cut else 0)

    def load_native_mask(
        self, path: Path | str | None, image_size: tuple[int, int]
    ) -> Image.Image | None:
        """`native_mask` of a mask file (None or empty: None, no defect)."""
        if not path:
            return None
        try:
            return self.native_mask(read_mask(path), image_size)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None

    def _check_mask_size(self, mask: Image.Image, image_size: tuple[int, int]) -> None:
        if mask.size != tuple(image_size) and not self.resize_masks:
            raise DataError(
                f"a mask is {mask.size[0]}x{mask.size[1]} but its image is "
                f"{image_size[0]}x{image_size[1]}; masks must match their image: fix it, or "
                "pass --resize_masks to resize it to the input as the original code does"
            )

    # -----------------------------------------------------------------------------------------
    # The two backends

    def _place_pil(
        self, image: Image.Image, geometry: Geometry, resample: Image.Resampling
    ) -> Image.Image:
        """PIL: the image's `crop` resized into the content rectangle of an S x S canvas."""
        size = self.size
        if self.geometry == "short_side_crop":  # torchvision's rounding of the long side
            interpolation = _TORCH_INTERPOLATION[_name_of(resample)]
            short = TF.resize(image, size, interpolation=interpolation)
            return TF.center_crop(short, [size, size])
        content = image.resize((geometry.content_width, geometry.content_height), resample)
        if self.geometry == "square":
            return content
        fill = tuple(self.pad_color) if image.mode == "RGB" else 0
        canvas = Image.new(image.mode, (size, size), fill)
        canvas.paste(content, (geometry.left, geometry.top))
        return canvas

    def _place_tensor(
        self, tensor: torch.Tensor, geometry: Geometry, interpolation: str, fill: list[float]
    ) -> torch.Tensor:
        """torch: `[C, H, W]` float resized by torchvision v2 into the content rectangle."""
        size = self.size
        mode = _TORCH_INTERPOLATION[interpolation]
        antialias = interpolation != "nearest"
        if self.geometry == "short_side_crop":
            short = TF2.resize(tensor, [size], interpolation=mode, antialias=antialias)
            return TF2.center_crop(short, [size, size])
        content = TF2.resize(
            tensor,
            [geometry.content_height, geometry.content_width],
            interpolation=mode,
            antialias=antialias,
        )
        if self.geometry == "square":
            return content
        canvas = torch.tensor(fill, dtype=tensor.dtype).view(-1, 1, 1).repeat(1, size, size)
        rows = slice(geometry.top, geometry.top + geometry.content_height)
        cols = slice(geometry.left, geometry.left + geometry.content_width)
        canvas[:, rows, cols] = content
        return canvas


def _name_of(resample: Image.Resampling) -> str:
    return next(name for name, value in _PIL_RESAMPLE.items() if value == resample)


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
