"""Photo bytes -> the model's uint8 input (no torch: the service runs this).

Every failure becomes ``BadImageError`` with a message a user can act on; nothing else escapes.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..config import PreprocessConfig
from ..errors import BadImageError
from ..files import FileReadError, read_regular_file, walk
from ..names import escaped

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
MAX_PIXELS = int(os.environ.get("EXTENDSERVE_MAX_PIXELS", 64_000_000))
MAX_FILE_BYTES = int(os.environ.get("EXTENDSERVE_MAX_FILE_BYTES", 50 * 1024 * 1024))
_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits a sample
_NEUTRAL = (124, 116, 104)  # roughly the ImageNet mean: transparent areas look like "nothing"
_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def decode(data: bytes | bytearray | memoryview, source: str = "image", min_side: int | None = None) -> Image.Image:
    """Bytes -> upright RGB PIL image.

    ``min_side``: the shorter side the caller will resize to. A JPEG at least twice that size is
    decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (Pillow's ``draft``), never below
    ``min_side``: 2.8x faster on 2- and 12-megapixel photos, 0.3-0.6 grey levels mean difference
    after the resize (``python bench/serving/pipeline_bench.py``). Smaller photos decode exactly as without it.
    Handles EXIF orientation, 16-bit and float greyscale (scaled, not clipped), CMYK, palette and
    alpha (composited on a neutral grey), animations (first frame). The pixel count is checked
    from the header, before any pixel is decoded.
    """
    if not data:
        raise BadImageError(f"{source}: empty file; send the photo's bytes")
    try:
        with warnings.catch_warnings():
            # Pillow's bomb warning counts the pixels in the header; a JPEG is decoded at reduced
            # scale below, so the limit applies to what is really decoded, checked next.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if min_side and im.format == "JPEG" and min(w, h) >= 2 * min_side:
            k = min_side / min(w, h)
            im.draft("RGB", (max(min_side, math.ceil(w * k)), max(min_side, math.ceil(h * k))))
        if im.size[0] * im.size[1] > MAX_PIXELS:  # a phone's 9000x9000 JPEG decodes at 1/8: 1125x1125
            raise BadImageError(
                f"{source}: {w}x{h} pixels is over the limit of {MAX_PIXELS} (EXTENDSERVE_MAX_PIXELS) for a "
                f"{im.format or 'photo'} that cannot be decoded at reduced scale; resize it or save it as JPEG"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if getattr(im, "is_animated", False):
                im.seek(0)
            im.load()
            # Shrink by a whole factor before any conversion, so no full-size copy is ever made in
            # a wider type (a 7900x7900 16-bit PNG once cost 2.1 GB as float64).
            factor = max(1, min(im.size) // (2 * min_side)) if min_side else 1
            orientation = _orientation(im)  # read first: the conversions below make new images without EXIF
            if im.mode in _WIDE:
                im = _wide_to_l(im, factor)
            elif im.mode in ("P", "1") and factor > 1:
                im = _banded_reduce(im, factor)
            elif factor > 1:
                im = im.reduce(factor)
            if orientation in _TRANSPOSE:
                im = im.transpose(_TRANSPOSE[orientation])
            return _to_rgb(im)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{source}: refused as a decompression bomb ({e})") from None
    except Image.DecompressionBombWarning as e:
        raise BadImageError(f"{source}: refused as a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(
            f"{source}: not a recognised image format; use a JPEG, PNG, WebP, GIF, BMP or TIFF"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError) as e:
        raise BadImageError(f"{source}: the image data is corrupt or truncated ({e})") from None
    except MemoryError:
        raise BadImageError(f"{source}: the image is too large to decode") from None


HEADER_BYTES = 4 * 2**20  # where a photo's size and mode are found (EXIF and ICC blocks come before a JPEG's frame)
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}  # else 4 (Pillow's layout)


def decode_cost(data: bytes | bytearray | memoryview, min_side: int | None = None) -> int:
    """The bytes :func:`decode` will hold at its peak for ``data``, from its header alone: a copy of
    the bytes, the image as Pillow stores it (4 bytes a pixel for RGB; a JPEG at the scale ``draft``
    will pick) and a quarter more for the reduced copies. 0 for what is not an image (decode says why)."""
    im = None
    for head in (data[:HEADER_BYTES], data) if len(data) > HEADER_BYTES else (data,):  # the header alone, not a copy of all
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(head))
            break
        except Exception:  # noqa: BLE001 - whatever it is, decode refuses it with the reason
            continue
    if im is None:
        return len(data)
    w, h = im.size
    mode, fmt = im.mode, im.format
    if min_side and fmt == "JPEG":
        for scale in (8, 4, 2):
            if min(w, h) // scale >= min_side:
                w, h = math.ceil(w / scale), math.ceil(h / scale)
                break
    return len(data) + int(w * h * _STORED_BYTES.get(mode, 4) * 1.25)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> what makes the photo upright (as ImageOps does)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1


def _bands(h: int, w: int, factor: int) -> range:
    """Row offsets of bands of about a megapixel, each a whole number of ``factor`` rows."""
    rows = max(1, (1 << 20) // max(w, 1) // factor) * factor
    return range(0, (h // factor) * factor, rows)


def _banded_reduce(im: Image.Image, factor: int) -> Image.Image:
    """A palette or 1-bit photo, converted and box-reduced a band of rows at a time: converting it
    whole first made a full-size RGBA copy (a 7.8 KB 1-bit PNG of 7999x7999 cost 550 MB)."""
    mode = "RGBA" if im.mode == "P" and "transparency" in im.info else "RGB"
    w, h = im.size
    ow, oh = max(1, w // factor), max(1, h // factor)
    out = Image.new(mode, (ow, oh))
    bands = _bands(h, w, factor)
    for top in bands:
        band = im.crop((0, top, ow * factor, min(top + bands.step, oh * factor))).convert(mode).reduce(factor)
        out.paste(band, (0, top // factor))
    return out


def _wide_to_l(im: Image.Image, factor: int) -> Image.Image:
    """16-bit, 32-bit and float greyscale -> 8-bit, scaled (not clipped) and box-reduced by
    ``factor``, a band of rows at a time: memory beyond the decoded photo stays a few rows."""
    w, h = im.size
    ow, oh = max(1, w // factor), max(1, h // factor)
    bands = _bands(h, w, factor)

    def band_at(top: int) -> np.ndarray:
        a = np.asarray(im.crop((0, top, ow * factor, min(top + bands.step, oh * factor))), dtype=np.float32)
        return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)  # one inf pixel once made the photo black

    if im.mode.startswith("I;16"):
        hi = 65535.0
    else:  # the largest finite value, a band at a time
        hi = max([1.0, *(float(band_at(top).max(initial=0.0)) for top in bands)])
        if im.mode == "I" and hi <= 255:
            hi = 255.0
    out = np.empty((oh, ow), np.uint8)
    for top in bands:
        band = band_at(top)
        band = band.reshape(band.shape[0] // factor, factor, ow, factor).mean(axis=(1, 3))
        out[top // factor : top // factor + len(band)] = np.clip(band / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, _NEUTRAL + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def resize_shorter(im: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Shorter side to ``size`` (as torchvision's Resize(int) does) -> uint8 HWC array."""
    w, h = im.size
    ow, oh = (size, max(1, int(size * h / w))) if w <= h else (max(1, int(size * w / h)), size)
    return np.asarray(im.resize((ow, oh), _FILTERS[interpolation]))


def resize_crop(im: Image.Image, cfg: PreprocessConfig, flip: bool = False) -> np.ndarray:
    """Shorter side to ``cfg.resize``, centred ``cfg.crop`` square -> uint8 HWC array."""
    return center_crop(resize_shorter(im, cfg.resize, cfg.interpolation), cfg.crop, flip)


def center_crop(a: np.ndarray, size: int, flip: bool = False) -> np.ndarray:
    h, w = a.shape[:2]
    if h < size or w < size:  # thin strips: pad with the neutral colour, as torchvision pads
        out = np.empty((max(h, size), max(w, size), 3), np.uint8)
        out[...] = _NEUTRAL
        top, left = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
        out[top : top + h, left : left + w] = a
        a, h, w = out, out.shape[0], out.shape[1]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    a = a[top : top + size, left : left + size]
    return np.ascontiguousarray(a[:, ::-1] if flip else a)


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_images(folder: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Photo files (by extension) under ``folder``, sorted, hidden files and folders left out."""
    root = Path(folder)
    found = walk(root) if recursive else root.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not is_hidden(p, root))


def read_photo(path: str | os.PathLike[str]) -> bytes:
    """A photo file's bytes (regular file, size checked first), or BadImageError saying why."""
    try:
        return read_regular_file(path, MAX_FILE_BYTES, "photo")
    except FileReadError as e:
        raise BadImageError(escaped(f"{e} (EXTENDSERVE_MAX_FILE_BYTES)" if "limit" in str(e) else str(e))) from None


def load_image(path: str | os.PathLike[str], min_side: int | None = None) -> Image.Image:
    return decode(read_photo(path), escaped(str(path)), min_side)


def prepare_file(path: str | os.PathLike[str], cfg: PreprocessConfig) -> np.ndarray:
    """A photo file -> [crop, crop, 3] uint8, exactly as :func:`prepare` does for bytes."""
    return resize_crop(load_image(path, cfg.resize), cfg)


def prepare(data: bytes, cfg: PreprocessConfig, source: str = "image") -> np.ndarray:
    """Bytes -> [crop, crop, 3] uint8, exactly what ``model.onnx`` takes per photo."""
    return resize_crop(decode(data, source, cfg.resize), cfg)


def prepare_image(image: Any, cfg: PreprocessConfig) -> np.ndarray:
    """A PIL image, an H x W x 3 uint8 RGB array, photo bytes or a file path -> [crop, crop, 3]
    uint8 as the model takes it: the Python API's one door, so a notebook cannot skip a step."""
    if isinstance(image, (str, os.PathLike)):
        return prepare_file(image, cfg)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return prepare(bytes(image), cfg)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BadImageError(f"an array of {image.dtype} {image.shape}: give H x W x 3 uint8 RGB values 0-255 "
                                "(np.asarray(pil_image.convert('RGB')))")
        image = Image.fromarray(image, "RGB")
    if not isinstance(image, Image.Image):
        raise BadImageError(f"a {type(image).__name__}: give a PIL image, an H x W x 3 uint8 array, bytes or a path")
    return resize_crop(_to_rgb(image), cfg)
