"""Turn user images into the pixel tensors attacks work on: float (B, 3, H, W) in [0, 1] at model resolution.

Every image becomes RGB, in the Python API as on the command line: grey (``L``, 16-bit ``I;16``, an (H, W) or
(H, W, 1) array) is repeated over the three channels, palette and CMYK images are converted, and alpha
(``RGBA``, ``LA``, ``PA``, a palette's transparency, an (H, W, 4) or (H, W, 2) array) is composited on white --
what a viewer shows and what Hugging Face's ``convert_to_rgb`` does -- never silently dropped (PIL's
``convert("RGB")`` would reveal whatever colour transparent pixels happen to hold). An empty image (a
0-pixel side) or something that is no image is one line naming the file or the argument.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserInputError

ACCEPTED = ("a PIL image (any mode: converted to RGB, alpha on white), an (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or "
            "(H, W, 4) uint8/uint16/float array (grey, grey+alpha, RGB, RGBA), a (3, H, W) or (B, 3, H, W) float "
            "tensor in [0, 1], or an image file path")


def check_pixels(pixels: Any, size: int | tuple[int, int]) -> torch.Tensor:
    """Validate a pixel batch: (B, 3, H, W) floating tensor, finite, within [0, 1], at the model's resolution."""
    h, w = (size, size) if isinstance(size, int) else size
    if not isinstance(pixels, torch.Tensor):
        raise UserInputError(f"pixels must be a torch tensor, got {type(pixels).__name__}; accepted: {ACCEPTED}")
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise UserInputError(f"pixels must have shape (B, 3, {h}, {w}), got {tuple(pixels.shape)}")
    if not pixels.is_floating_point():
        raise UserInputError(f"pixels must be a floating tensor in [0, 1], got dtype {pixels.dtype}")
    if tuple(pixels.shape[-2:]) != (h, w):
        raise UserInputError(
            f"image size {tuple(pixels.shape[-2:])} does not match the model's input resolution ({h}, {w}); "
            "resize first (to_pixels(..., resize=True))"
        )
    if not torch.isfinite(pixels).all():
        raise UserInputError("pixels contain NaN or infinite values; accepted: finite values in [0, 1]")
    lo, hi = pixels.min().item(), pixels.max().item()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise UserInputError(f"pixel values must lie in [0, 1], got range [{lo:.3g}, {hi:.3g}] (normalisation is done inside)")
    return pixels


MAX_IMAGE_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (about 9459 x 9459)
IMAGE_FILES = "an image file PIL decodes (PNG, JPEG, WebP, ...), at most {:,} pixels".format(MAX_IMAGE_PIXELS)


def open_image(path: str | Path) -> Any:
    """An image file fully decoded as an RGB PIL image; any other mode (grey, palette, alpha, CMYK, 16-bit,
    ...) is converted. A missing, unreadable, truncated or oversized file is one line naming it."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise UserInputError(f"{path}: {w}x{h} pixels exceeds the decompression-bomb limit; "
                                         f"accepted: {IMAGE_FILES}")
                im.load()
                return _rgb(im)
    except UserInputError:
        raise
    except UnidentifiedImageError:
        raise UserInputError(f"{path} is not an image file PIL can read; accepted: {IMAGE_FILES}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserInputError(f"{path}: too many pixels (decompression-bomb limit); accepted: {IMAGE_FILES}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"{path}: cannot decode the image ({problem}); accepted: {IMAGE_FILES}") from None


def _rgb(im) -> Any:
    """An RGB copy of a decoded PIL image: 16/32-bit grey scaled from its range, alpha (a band or a palette's
    transparency) composited on white, everything else converted."""
    from PIL import Image

    if im.mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        array = np.asarray(im).astype(np.float64)
        scale = 1.0 if im.mode == "F" else 65535.0 if im.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = (np.clip(array / scale, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    return im.convert("RGB")


def _rgb_array(image: np.ndarray) -> torch.Tensor:
    """(3, H, W) float in [0, 1] from an (H, W) / (H, W, C) array, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA
    (alpha composited on white); uint8 and uint16 are scaled from their range, floats taken as [0, 1]."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise UserInputError(f"image array has shape {image.shape}; accepted: {ACCEPTED}")
    if 0 in image.shape:
        raise UserInputError(f"image array is empty (shape {image.shape}); accepted: {ACCEPTED}")
    if image.dtype in (np.uint8, np.uint16):
        array = image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    elif np.issubdtype(image.dtype, np.floating):
        array = image.astype(np.float32)
    else:
        raise UserInputError(f"image array dtype {image.dtype} is not supported; accepted: uint8, uint16 or float "
                             "in [0, 1]")
    if array.shape[2] in (2, 4):  # alpha on white
        colour, alpha = array[..., :-1], np.clip(array[..., -1:], 0, 1)
        array = colour * alpha + (1 - alpha)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def to_pixels(image: Any, size: int | tuple[int, int], resize: bool = False) -> torch.Tensor:
    """One image (PIL, array, tensor or path) -> (1, 3, H, W) float tensor in [0, 1].

    Resizing is opt-in (bicubic, in torch) because the attack's threat model is stated at model resolution.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if isinstance(image, (str, Path)):
        image = np.asarray(open_image(image))  # already an RGB copy
    if type(image).__module__.startswith("PIL."):
        if 0 in image.size:
            raise UserInputError(f"image is empty ({image.size[0]}x{image.size[1]} pixels); accepted: {ACCEPTED}")
        image = np.asarray(_rgb(image))
    if isinstance(image, np.ndarray):
        image = _rgb_array(image)
    if not isinstance(image, torch.Tensor):
        raise UserInputError(f"not an image: {type(image).__name__}; accepted: {ACCEPTED}")
    if 0 in image.shape:
        raise UserInputError(f"image tensor is empty (shape {tuple(image.shape)}); accepted: {ACCEPTED}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if resize and image.dim() == 4 and tuple(image.shape[-2:]) != (h, w):
        image = torch.nn.functional.interpolate(image.float(), size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return check_pixels(image, (h, w))
