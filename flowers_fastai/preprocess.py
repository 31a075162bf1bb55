"""Opening photos and the deterministic inference preprocessing, shared by training and `submit`.

Plain PIL + torch (no fastai): `submit` imports it, and the fastai validation pipeline calls the very same
functions, so what a model is validated on and what it predicts on cannot drift apart.
"""
from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's published statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DRAFT_FLOOR = 512  # JPEGs decode at reduced scale only while both sides stay >= this (or 2x the resize)
# Images with one side over this many times the other are refused before decoding: the resize of the shorter
# side would make the longer one up to this many times the crop (a 1 x 100000 PNG: 256 x 25.6 million pixels).
MAX_ASPECT_RATIO = 50
# Conversions to 8-bit RGB run over stripes of about this many pixels: their temporaries stay a few tens of MB.
STRIPE_PIXELS = 1 << 20
# The resize of the shorter side makes at most this many pixels (192 MB as RGB): an allowed sidecar (image_size
# 2048, crop_pct 0.25: a shorter side of 8192) times an allowed 50:1 photo asked for a ~13 GB resize. The CNN's
# default pipeline needs at most 50 x 256 x 256 = 3.3 Mpx; a square photo fits any allowed sidecar.
MAX_RESIZE_PIXELS = 1 << 26
_MISSING = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}   # what Path.exists() took for "does not exist"


@dataclass(frozen=True)
class Preprocessing:
    """How one model family wants its input: resize the shorter side to `size / crop_pct`, center-crop `size`."""
    size: int
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def resize_to(self) -> int:
        return int(round(self.size / self.crop_pct))


def cnn_preprocessing(size: int = 224) -> Preprocessing:
    return Preprocessing(size, 0.875, IMAGENET_MEAN, IMAGENET_STD)  # timm's ConvNeXt V2 eval crop


def vit_preprocessing(size: int = 224) -> Preprocessing:
    return Preprocessing(size, 1.0, CLIP_MEAN, CLIP_STD)  # open_clip's eval transform: resize + center crop


class TruncatedImageWarning(UserWarning):
    """A photo whose file ends early; the decodable part was used."""


class _Refused(ValueError):
    """An image refused on its size, before decoding (re-raised as a plain ValueError)."""


def _refuse_oversized(path: Path, size: tuple[int, int]) -> None:
    """Refuse sizes that would take unbounded memory to decode or to resize. An explicit check, not PIL's
    `DecompressionBombWarning` turned into an error: warning filters are process-wide, and changing them per
    call raced with other threads' decodes (a bomb then slipped through)."""
    w, h = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise _Refused(f'{path} is refused: {w}x{h} = {w * h} pixels is over the decompression-bomb limit of '
                       f'{limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)')
    if not _photo_shape(w, h):
        raise _Refused(f'{path} is refused: {w}x{h} pixels is no photo (the longer side may be at most '
                       f'{MAX_ASPECT_RATIO} times the shorter one)')


def _photo_shape(w: int, h: int) -> bool:
    return min(w, h) >= 1 and max(w, h) <= MAX_ASPECT_RATIO * min(w, h)


def _to_rgb(img: Image.Image, hi: float | None) -> Image.Image:
    """One image (or stripe of one) as a new 8-bit RGB image; `hi` the full scale of a 16/32-bit one."""
    if hi is not None:
        # PIL's convert() clips 16/32-bit values to 0..255 (a white picture); rescale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), 'L')
    has_alpha = img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (img.mode == 'P' and 'transparency' in img.info)
    if has_alpha:  # composite on white: a transparent background would otherwise turn black
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')


def _stripes(img: Image.Image) -> list[tuple[int, int, int, int]]:
    w, h = img.size
    rows = max(1, STRIPE_PIXELS // w)
    return [(0, top, w, min(h, top + rows)) for top in range(0, h, rows)]


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB image of `img` (RGB, alpha composited on white, 16/32-bit rescaled). Every step is per
    pixel, so it is done in stripes of rows: whole-image temporaries (the float64 array, the RGBA copy, the
    white background) never exist, and the peak is the decoded image plus the RGB result."""
    if img.mode == 'RGB':
        return img.copy()   # the caller closes `img`
    boxes, hi = _stripes(img), None
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        if img.mode.startswith('I;16'):
            hi = 65535.0
        else:   # the same maximum (NaN included) as np.asarray(img).max(), a stripe at a time
            peak = np.max([np.asarray(img.crop(box), dtype=np.float64).max() for box in boxes])
            hi = 65535.0 if peak > 255 else 255.0
    if len(boxes) == 1:
        return _to_rgb(img, hi)
    out = Image.new('RGB', img.size)
    for box in boxes:
        out.paste(_to_rgb(img.crop(box), hi), box[:2])
    return out


def _end_jpeg_at_eof(img: Image.Image) -> list[bool]:
    """Let a JPEG that ends early decode as far as it goes: at the end of the file hand libjpeg an end-of-image
    marker once, so that it finishes the picture (the missing part gray). That is what PIL's
    `JpegImageFile.load_read` does under `ImageFile.LOAD_TRUNCATED_IMAGES`, but set on this image only: the
    flag is process-wide, and toggling it per call leaked it to (and from) other threads. Returns a list
    that holds True once the marker was needed, i.e. once the file turned out to be truncated."""
    fp, ended = img.fp, []   # fp, not img, in the closure: no reference cycle keeps the pixels alive

    def load_read(read_bytes: int) -> bytes:
        data = fp.read(read_bytes)
        if not data and not ended:
            ended.append(True)
            return b'\xff\xd9'
        return data
    img.load_read = load_read
    return ended


# Formats whose pixel data starts where PIL stopped reading the header (JPEG: after the scan header; PNG: the
# first IDAT's data; BMP: the pixel array): a file that ends there holds no pixel at all.
_HEADER_THEN_PIXELS = ('JPEG', 'MPO', 'PNG', 'BMP', 'DIB')


def _refuse_header_only(path: Path, img: Image.Image, file_size: int) -> None:
    """One rule for every format: a file with a header and no pixel data is a `ValueError`, as PIL already
    makes it for GIF and TIFF (JPEG, PNG and BMP got a class of a blank picture, and a truncation warning)."""
    if img.format in _HEADER_THEN_PIXELS and img.tile:
        start = max(img.fp.tell(), min(tile[2] for tile in img.tile))
        if file_size <= start:
            raise _Refused(f'{path} has a {img.format} header and no pixel data ({file_size} bytes, the pixels would '
                           f'start at byte {start})')


def _decode(path: Path, draft_min_side: int | None, file_size: int) -> tuple[Image.Image, bool]:
    with Image.open(path) as img:
        # No img.seek(0): a just-opened image is on its first frame already (animated GIF/WEBP), and a PSD
        # (whose layers are frames 1...) raised there instead of giving its flattened image.
        _refuse_oversized(path, img.size)
        _refuse_header_only(path, img, file_size)
        ended = []
        if isinstance(img, JpegImagePlugin.JpegImageFile):   # MPO too
            if draft_min_side and img.format == 'JPEG':
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_min_side:
                # an 8000x6000 photo is never materialised at full size.
                img.draft('RGB', (draft_min_side, draft_min_side))
            ended = _end_jpeg_at_eof(img)
        try:
            img.load()
        except OSError as err:
            if 'truncated' not in str(err) and 'broken data stream' not in str(err):
                raise
            # The file ends early (or the decoder gave up on its last bytes): keep what was decoded, as PIL does
            # under ImageFile.LOAD_TRUNCATED_IMAGES, without that process-wide flag. Where nothing was decoded
            # (no image memory yet), this second load() raises "cannot load this image".
            img.tile = []
            img.load()
            ended.append(True)
        _refuse_oversized(path, img.size)   # a few formats (ICO, ICNS, EPS...) settle their size while loading
        ImageOps.exif_transpose(img, in_place=True)   # in place: no second full-size copy of an upright photo
        return _to_8bit_rgb(img), bool(ended)


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0]}' if text else type(err).__name__


def decode_image(image_path: str | os.PathLike,
                 draft_min_side: int | None = None) -> tuple[Image.Image, bool]:
    """`open_image` without the warning: (the 8-bit RGB image, whether the file was truncated). Changes no
    process-wide state (no warning filter, no `ImageFile.LOAD_TRUNCATED_IMAGES`): safe in threads."""
    path = Path(image_path)
    try:
        st = path.stat()
    except OSError as err:
        if err.errno in _MISSING:
            raise FileNotFoundError(f'No such image: {path}') from None
        raise ValueError(f'{path} cannot be read: {err.strerror or _reason(err)}') from None   # ENAMETOOLONG...
    except ValueError as err:   # an embedded NUL byte, a name the file system cannot encode
        raise ValueError(f'{path} is not a usable path: {err}') from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f'{path} is a directory, not an image file')
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f'{path} is not a regular file (a device, a pipe or a socket), not an image file')
    if st.st_size == 0:
        raise ValueError(f'{path} is an empty file, not an image')
    try:
        return _decode(path, draft_min_side, st.st_size)
    except _Refused as err:
        raise ValueError(str(err)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's own refusal at twice the limit in Image.open (or its warning, where the caller's filters raise it)
        raise ValueError(f'{path} is refused: {err}') from None
    except UnidentifiedImageError:
        raise ValueError(f'{path} is not an image PIL can decode') from None
    except FileNotFoundError:
        if not os.path.lexists(path):   # removed while being read
            raise FileNotFoundError(f'No such image: {path}') from None
        raise ValueError(f'{path} could not be decoded as an image: a file it refers to is missing') from None
    except MemoryError:
        # Within the size limits one image needs a bounded amount of memory (docs/api.md: ~8 bytes per pixel);
        # running out here says this file is too large for the memory left, not that the process is lost:
        # what the decoder took is freed as the call fails, and the next photo goes on.
        raise ValueError(f'{path} could not be decoded: not enough memory for an image of its size') from None
    except Exception as err:   # noqa: BLE001 - any decoder's failure, of any type (NotImplementedError from a
        # DDS pixel format, EOFError, struct.error...), is this file's failure: one documented exception
        raise ValueError(f'{path} could not be decoded as an image: {_reason(err)}') from None


def open_image(image_path: str | os.PathLike, draft_min_side: int | None = None) -> Image.Image:
    """Open any photo PIL can decode as an 8-bit RGB image, upright (EXIF orientation applied).

    Raises `FileNotFoundError` for a path that does not exist and `ValueError` (naming the path) for
    anything else that is not a decodable image: a directory, an empty file, text, random bytes, a path
    too long to open, any decoder failure, an image over PIL's decompression-bomb limit or with one side
    over `MAX_ASPECT_RATIO` times the other (both refused before decoding). A truncated file is used as far
    as it decodes, with a `TruncatedImageWarning` (`decode_image` returns that flag instead of warning).
    """
    img, truncated = decode_image(image_path, draft_min_side)
    if truncated:
        warnings.warn(f'{image_path}: truncated image file, only its decodable part was used',
                      TruncatedImageWarning)
    return img


def resized_size(size: tuple[int, int], pp: Preprocessing) -> tuple[int, int]:
    """The size of an image of `size` with its shorter side resized to `pp.resize_to` (neither side under
    `pp.size`). `ValueError` beyond `MAX_ASPECT_RATIO`: the resize would be that many times the crop."""
    w, h = size
    if not _photo_shape(w, h):
        raise ValueError(f'a {w}x{h} image is no photo: the longer side may be at most {MAX_ASPECT_RATIO} times '
                         'the shorter one')
    scale = pp.resize_to / min(w, h)
    out = max(pp.size, round(w * scale)), max(pp.size, round(h * scale))
    if out[0] * out[1] > MAX_RESIZE_PIXELS:
        raise ValueError(f'a {w}x{h} image would be resized to {out[0]}x{out[1]} pixels for this model '
                         f'(shorter side {pp.resize_to}), over the limit of {MAX_RESIZE_PIXELS} pixels')
    return out


def resize_center_crop(img: Image.Image, pp: Preprocessing) -> Image.Image:
    """Resize the shorter side to `pp.resize_to` (bicubic), then crop the central `pp.size` square.

    Not `img.resize(..., box=crop)`, which would compute only the kept pixels (0.6 ms faster on the examples):
    PIL then orders its two passes differently and rounds in between, and on the 3,887 photos of the data set
    that changed pixels by up to 20 levels of 255, mostly on photos smaller than the resize."""
    return center_crop(resize_shorter_side(img, pp), pp)


def resize_shorter_side(img: Image.Image, pp: Preprocessing) -> Image.Image:
    """`img` with its shorter side resized to `pp.resize_to` (bicubic; neither side under `pp.size`). At most
    `MAX_ASPECT_RATIO` * `pp.resize_to`**2 pixels (`resized_size` refuses longer images)."""
    return img.resize(resized_size(img.size, pp), Image.BICUBIC)


def center_crop(resized: Image.Image, pp: Preprocessing) -> Image.Image:
    """The central `pp.size` square of a resized image."""
    left, top = (resized.width - pp.size) // 2, (resized.height - pp.size) // 2
    return resized.crop((left, top, left + pp.size, top + pp.size))


def to_normalized_tensor(img: Image.Image, pp: Preprocessing) -> torch.Tensor:
    """uint8 HWC image -> normalised float32 1x3xHxW tensor (channels-last in memory), the same arithmetic as
    fastai's `IntToFloatTensor` + `Normalize` ((x / 255 - mean) / std) so that validation and `submit` agree to
    the last bit. Done in place on H rows of W (r, g, b) triples, against a row of W repeated means and stds:
    broadcasting the 3 means and stds instead made this function take 0.33 ms rather than 0.13 at 224 px here."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float()
    height, width, _ = x.shape
    rows = x.view(height, width * 3)
    rows.div_(255.0).sub_(torch.tensor(pp.mean).repeat(width)).div_(torch.tensor(pp.std).repeat(width))
    return x.permute(2, 0, 1).unsqueeze(0)


def load_for_model(image_path: str | os.PathLike, pp: Preprocessing) -> torch.Tensor:
    """Path -> the model's input tensor (1x3xSxS)."""
    # JPEG draft decoding only where it pays (photos over ~2x the size needed): smaller photos decode
    # exactly as in training, so the model sees the same pixels it was validated on.
    img = open_image(image_path, draft_min_side=max(DRAFT_FLOOR, 2 * pp.resize_to))
    check_resize(image_path, img, [pp])
    return to_normalized_tensor(resize_center_crop(img, pp), pp)


def check_resize(image_path, img: Image.Image, pps: list[Preprocessing]) -> None:
    """`ValueError` naming the path when resizing `img` for any of `pps` is refused (`resized_size`)."""
    for pp in pps:
        try:
            resized_size(img.size, pp)
        except ValueError as err:
            raise ValueError(f'{image_path} is refused: {err}') from None
