"""Reading and writing 2-D images.

* Reading: Pillow when it is installed (PNG, JPEG, TIFF, BMP, ...). Without Pillow, PNG files are still read by a
  small pure-numpy/zlib decoder (8- and 16-bit, grey, grey+alpha, RGB, RGBA and palette, non-interlaced); other
  formats raise :class:`ImageReadError` saying that Pillow is needed (``pip install pillow``).
* Writing: PNG with a pure-numpy/zlib encoder (no dependency). Files are written to a temporary name and moved into
  place with ``os.replace``, so a reader never sees a half-written file.

Every error names the file.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Optional

import numpy as np

from emcad.io_safety import atomic_write_bytes  # re-exported: the one atomic, umask-honouring writer

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "atomic_write_bytes", "encode_png", "read_image", "write_png"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageReadError(ValueError):
    """An image or mask file cannot be read; the message names the file."""


def _have_pillow() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def read_image(path: str | os.PathLike, *, as_mask: bool = False) -> np.ndarray:
    """Read an image as a numpy array: ``(H, W)`` for grey / binary files, ``(H, W, 3)`` for colour ones (alpha
    dropped). Palette files give their palette indices with ``as_mask=True`` (class-index masks) and their
    colours otherwise. The dtype is the file's (uint8, uint16, int32, float32)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"'{path}': no such file")
    ext = os.path.splitext(path)[1].lower()
    if _have_pillow():
        return _read_pillow(path, as_mask)
    if ext == ".png":
        return _read_png(path, as_mask)
    raise ImageReadError(f"'{path}': reading {ext or 'this'} files needs Pillow, which is not installed "
                         f"(pip install pillow, or the package's [data] extra); PNG files are read without it")


def _read_pillow(path: str, as_mask: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                arr = np.asarray(im) if as_mask else np.asarray(im.convert("RGB"))
            elif mode in ("RGBA", "LA", "PA"):
                arr = np.asarray(im.convert("RGB" if mode == "RGBA" else "L"))
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                arr = np.asarray(im.convert("RGB"))
            elif mode == "1":
                arr = np.asarray(im).astype(np.uint8) * 255  # as the PNG fallback: 1-bit grey -> 0/255
            else:
                arr = np.asarray(im)
    except UnidentifiedImageError as e:
        raise ImageReadError(f"'{path}': not a readable image (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated files raise OSError on load()
        raise ImageReadError(f"'{path}': cannot be read (truncated or corrupt?): {e}") from e
    if arr.ndim not in (2, 3):
        raise ImageReadError(f"'{path}': unsupported image shape {arr.shape}")
    return np.array(arr)  # own, writable copy


# --------------------------------------------------------------------------------------------------
# pure-numpy PNG decoder (fallback when Pillow is missing)
# --------------------------------------------------------------------------------------------------
def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a.astype(np.int16) + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c)).astype(np.uint8)


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, path: str) -> np.ndarray:
    if len(raw) < height * (stride + 1):
        raise ImageReadError(f"'{path}': truncated PNG image data")
    rows = np.frombuffer(raw, dtype=np.uint8, count=height * (stride + 1)).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        ftype, line = rows[y, 0], rows[y, 1:].copy()
        if ftype == 0:
            pass
        elif ftype == 2:
            line = (line + prev).astype(np.uint8)
        elif ftype in (1, 3, 4):
            for x in range(stride):  # sequential dependency along the row
                left = int(line[x - bpp]) if x >= bpp else 0
                if ftype == 1:
                    line[x] = (int(line[x]) + left) & 0xFF
                elif ftype == 3:
                    line[x] = (int(line[x]) + ((left + int(prev[x])) >> 1)) & 0xFF
                else:
                    up_left = int(prev[x - bpp]) if x >= bpp else 0
                    line[x] = (int(line[x]) + int(_paeth(np.uint8(left), prev[x], np.uint8(up_left)))) & 0xFF
        else:
            raise ImageReadError(f"'{path}': corrupt PNG (unknown filter type {ftype} in row {y})")
        out[y] = line
        prev = line
    return out


def _read_png(path: str, as_mask: bool = False) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageReadError(f"'{path}': not a PNG file")
    pos, idat, header, palette = 8, [], None, None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if len(chunk) < length:
            break
        if ctype == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif ctype == b"PLTE":
            palette = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, 3)
        elif ctype == b"IDAT":
            idat.append(chunk)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ImageReadError(f"'{path}': truncated or corrupt PNG (missing IHDR/IDAT)")
    width, height, depth, color, _, _, interlace = header
    if interlace:
        raise ImageReadError(f"'{path}': interlaced PNG needs Pillow (pip install pillow)")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels is None or depth not in {0: (1, 2, 4, 8, 16), 3: (1, 2, 4, 8)}.get(color, (8, 16)):
        raise ImageReadError(f"'{path}': unsupported PNG (colour type {color}, bit depth {depth}); install Pillow")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ImageReadError(f"'{path}': truncated or corrupt PNG data ({e})") from e
    bits = depth * channels
    stride = (width * bits + 7) // 8
    rows = _unfilter(raw, height, stride, max(1, bits // 8), path)
    if depth < 8:
        arr = np.unpackbits(rows, axis=1)[:, :width * depth].reshape(height, width, depth)
        arr = (arr * (1 << np.arange(depth - 1, -1, -1, dtype=np.uint8))).sum(-1).astype(np.uint8)
        if color == 0:
            arr = (arr * (255 // ((1 << depth) - 1))).astype(np.uint8)
    elif depth == 16:
        arr = rows.view(">u2").astype(np.uint16).reshape(height, width, channels)
    else:
        arr = rows.reshape(height, width, channels)
    if arr.ndim == 3:
        if channels == 2:
            arr = arr[..., 0]
        elif channels == 4:
            arr = arr[..., :3]
        elif channels == 1:
            arr = arr[..., 0]
    if color == 3 and not as_mask:
        if palette is None:
            raise ImageReadError(f"'{path}': palette PNG without a PLTE chunk")
        arr = palette[np.minimum(arr, len(palette) - 1)]
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------------
# PNG encoder
# --------------------------------------------------------------------------------------------------
def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8/uint16/bool array ``(H, W)`` (grey) or ``(H, W, 3|4)`` (RGB/RGBA)."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"encode_png needs uint8, uint16 or bool data, got {a.dtype}")
    if a.ndim == 2:
        color, channels = 0, 1
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        color, channels = (2 if a.shape[2] == 3 else 6), a.shape[2]
    else:
        raise ValueError(f"encode_png needs (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    h, w = a.shape[:2]
    depth = 16 if a.dtype == np.uint16 else 8
    body = a.astype(">u2").tobytes() if depth == 16 else np.ascontiguousarray(a).tobytes()
    stride = w * channels * depth // 8
    raw = b"".join(b"\x00" + body[y * stride:(y + 1) * stride] for y in range(h))

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return _PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, array: np.ndarray, *, scale_to: Optional[int] = None) -> None:
    """Write ``array`` as a PNG atomically. ``scale_to`` (e.g. 255) multiplies a label map by
    ``scale_to // max_label`` for viewing; by default values are written as they are."""
    a = np.asarray(array)
    if scale_to is not None and a.size and a.max() > 0:
        a = a.astype(np.int64) * (scale_to // int(a.max()))
    if a.dtype not in (np.uint8, np.uint16, bool):
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"write_png: values out of range [{a.min()}, {a.max()}] for '{path}'")
        a = a.astype(np.uint8 if (not a.size or a.max() <= 255) else np.uint16)
    atomic_write_bytes(path, encode_png(a), what="image")
