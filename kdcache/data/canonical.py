"""Canonical image bytes: every image is resized once and JPEG-encoded once; both stages read those bytes."""

import io
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = 200_000_000  # large but finite: a decompression bomb is still refused


@dataclass(frozen=True)
class CanonicalSettings:
    """max_side: longest side after the one resize (cv2 INTER_AREA, never upscales), None = keep size.
    jpeg_quality: the one JPEG encode (libjpeg-turbo through cv2, as FFCV's own writer encodes)."""

    max_side: int = 500
    jpeg_quality: int = 90

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize"] = "cv2.INTER_AREA, longest side"
        d["encoder"] = "cv2.imencode (libjpeg-turbo)"
        d["decoder"] = "ffcv libffcv imdecode (turbojpeg, TJFLAG_FASTDCT) in both stages"
        return d


@dataclass(frozen=True)
class CanonicalImage:
    jpeg: bytes
    height: int
    width: int


def load_rgb(payload) -> np.ndarray:
    """HxWx3 uint8 RGB from encoded bytes (any format Pillow reads) or from an array (HxW or HxWx3)."""
    if isinstance(payload, np.ndarray):
        arr = payload
        if arr.dtype != np.uint8:
            raise ValueError(f"pixel array must be uint8, got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"pixel array must be HxW or HxWx3, got shape {arr.shape}")
        return np.ascontiguousarray(arr)
    with Image.open(io.BytesIO(payload)) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def canonicalize(payload, settings: CanonicalSettings) -> CanonicalImage:
    rgb = load_rgb(payload)
    h, w = rgb.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"empty image ({h}x{w})")
    if settings.max_side and max(h, w) > settings.max_side:
        ratio = settings.max_side / max(h, w)
        new_w, new_h = max(1, round(w * ratio)), max(1, round(h * ratio))
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
        h, w = new_h, new_w
    if max(h, w) > 65535:  # FFCV stores sizes as uint16
        raise ValueError(f"image of {h}x{w} is too large for FFCV; set a max side")
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(settings.jpeg_quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return CanonicalImage(jpeg=buf.tobytes(), height=int(h), width=int(w))
