"""Images: decode bytes, and turn a PIL image into CLIP pixel values as the checkpoint's processor does.

The steps and their order are those of transformers' CLIP image processor (PIL backend), read
from the checkpoint's preprocessor_config.json: to RGB (transparency composited onto white),
resize so the shortest edge is `size` (PIL, bicubic by default, on the 8-bit image), center
crop, rescale by 1/255, normalize with the checkpoint's mean and std. Tested against it.

    PIL image -> pixel values [3, crop_height, crop_width] float32
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraplex.errors import ConfigError, InvalidRequestError

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3   # PIL.Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ImagePreprocessor:
    shortest_edge: int | None          # resize target of the shortest edge (aspect kept) ...
    resize_to: tuple[int, int] | None  # ... or a fixed (height, width)
    crop_size: tuple[int, int] | None  # (height, width) of the center crop; None: no crop
    resample: int = BICUBIC
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = CLIP_MEAN
    std: tuple[float, ...] | None = CLIP_STD

    @classmethod
    def from_dir(cls, model_dir: str | Path, image_size: int) -> "ImagePreprocessor":
        """The checkpoint's preprocessing; CLIP's defaults at `image_size` when it ships none."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            logger.warning("%s has no preprocessor_config.json; using CLIP's preprocessing at %d pixels",
                           model_dir, image_size)
            return cls(image_size, None, (image_size, image_size))
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}).") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "ImagePreprocessor":
        size = raw.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        shortest = size.get("shortest_edge") if raw.get("do_resize", True) else None
        fixed = (size["height"], size["width"]) if raw.get("do_resize", True) and "height" in size else None
        crop = raw.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            shortest_edge=None if fixed else shortest, resize_to=fixed,
            crop_size=(crop["height"], crop["width"]) if raw.get("do_center_crop", True) else None,
            resample=int(raw.get("resample", BICUBIC)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else None,
            mean=tuple(raw.get("image_mean", CLIP_MEAN)) if raw.get("do_normalize", True) else None,
            std=tuple(raw.get("image_std", CLIP_STD)) if raw.get("do_normalize", True) else None)

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the image."""
        return self.crop_size or self.resize_to

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise InvalidRequestError(f"an image must be a PIL.Image.Image, got {type(image).__name__}")
        image = to_rgb(image)
        height, width = image.height, image.width
        if self.resize_to is not None or self.shortest_edge is not None:
            new_height, new_width = self.resize_to or _shortest_edge_size(height, width, self.shortest_edge)
            image = image.resize((new_width, new_height), resample=self.resample)
        pixels = np.asarray(image)                                   # [H, W, 3] uint8
        if self.crop_size is not None:
            pixels = _center_crop(pixels, *self.crop_size)
        pixels = pixels.transpose(2, 0, 1)                           # [3, H, W]
        if self.rescale_factor is not None:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.mean is not None:
            mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None, None]
            pixels = (pixels.astype(np.float32) - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))


def to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """[H, W, C] -> [crop_height, crop_width, C]; an image smaller than the crop is padded with zeros."""
    height, width = pixels.shape[:2]
    if height < crop_height or width < crop_width:
        padded = np.zeros((max(height, crop_height), max(width, crop_width), pixels.shape[2]), dtype=pixels.dtype)
        top, left = -(-(padded.shape[0] - height) // 2), -(-(padded.shape[1] - width) // 2)
        padded[top:top + height, left:left + width] = pixels
        pixels, height, width = padded, padded.shape[0], padded.shape[1]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return pixels[top:top + crop_height, left:left + crop_width]


def decode_image(data: bytes, where: str):
    """A PIL image from encoded bytes (PNG, JPEG, ...); InvalidRequestError naming `where` if they are not one."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidRequestError(f"{where} is too large to decode ({e}); send a smaller image") from None
    except Exception as e:   # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise InvalidRequestError(f"{where} could not be decoded as an image ({type(e).__name__}: {e}); "
                                  f"send a PNG, JPEG, WebP or GIF") from None
    return image


class ImageItems:
    """The processor of one model's images: PIL image -> (pixel values, placeholder tokens)."""

    modality = "image"

    def __init__(self, preprocess: ImagePreprocessor, tokens_per_image: int):
        self.preprocess, self.tokens_per_image = preprocess, tokens_per_image

    def num_tokens(self, image, where: str, *, max_tokens: int | None = None) -> int:
        """Placeholder tokens of `image`; InvalidRequestError if it is no image or takes more than max_tokens."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise InvalidRequestError(f"{where} must be a PIL.Image.Image, got {type(image).__name__}")
        if max_tokens is not None and self.tokens_per_image > max_tokens:
            raise InvalidRequestError(f"{where} takes {self.tokens_per_image} tokens, but only {max_tokens} are left "
                                      f"of max_model_len beside the rest of the prompt; shorten the prompt")
        return self.tokens_per_image

    def __call__(self, image, where: str, *, max_tokens: int) -> tuple[torch.Tensor, int]:
        tokens = self.num_tokens(image, where, max_tokens=max_tokens)
        return self.preprocess(image), tokens
