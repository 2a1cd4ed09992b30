"""Planted overlays for the text-and-marks tests: skimage photos with subtitles, signatures, timestamps, tiled
watermarks and a video clip with a fixed logo; each comes with the box of what was drawn."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import data

#: skimage's photos (colour and gray) that ship inside the wheel: the clean set
CLEAN = ["astronaut", "camera", "cat", "chelsea", "coffee", "coins", "clock", "moon", "rocket", "hubble_deep_field",
         "immunohistochemistry", "retina", "grass", "gravel", "brick", "cell", "colorwheel"]
BASES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "moon"]
SIZES = [(512, 512), (640, 480), (800, 600), (480, 640), (1024, 768), (600, 400)]


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    arr = getattr(data, name)()
    if arr.dtype != np.uint8:
        arr = (arr * 255).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    return img.resize(size, Image.Resampling.LANCZOS) if size else img


def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def _text(img: Image.Image, xy: tuple[int, int], text: str, px: int, fill, anchor: str, stroke: int = 0,
          stroke_fill=(0, 0, 0), alpha: float = 1.0) -> list[int]:
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    a = round(255 * alpha)
    draw.text(xy, text, font=_font(px), fill=(*fill, a), anchor=anchor, stroke_width=stroke, stroke_fill=(*stroke_fill, a))
    box = draw.textbbox(xy, text, font=_font(px), anchor=anchor, stroke_width=stroke)
    img.paste(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"))
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def subtitle(img: Image.Image, text: str, colour=(255, 255, 255), band: bool = False, top: bool = False) -> list[int]:
    W, H = img.size
    px = max(14, H // 16)
    y = round(H * 0.07) if top else H - round(H * 0.06)
    if band:
        draw = ImageDraw.Draw(img, "RGBA")
        draw.rectangle([0, y - px - 8, W, y + 8] if not top else [0, y - 8, W, y + px + 8], fill=(0, 0, 0, 150))
    return _text(img, (W // 2, y), text, px, colour, "mt" if top else "mb", stroke=0 if band else max(1, px // 14))


def corner(img: Image.Image, text: str, where: str, colour=(255, 255, 255), alpha: float = 0.9, scale: float = 1 / 22) -> list[int]:
    W, H = img.size
    px = max(12, round(H * scale))
    m = max(6, W // 40)
    xy = {"br": (W - m, H - m), "bl": (m, H - m), "tr": (W - m, m), "tl": (m, m)}[where]
    anchor = {"br": "rb", "bl": "lb", "tr": "rt", "tl": "lt"}[where]
    x0, y0 = (0 if where[1] == "l" else W * 2 // 3), (0 if where[0] == "t" else H * 4 // 5)
    under = float(np.asarray(img.convert("L"))[y0:y0 + H // 5, x0:x0 + W // 3].mean())
    if abs(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] - under) < 70:  # a signer picks a colour that shows
        colour = (20, 20, 20) if under > 128 else (255, 255, 255)
    return _text(img, xy, text, px, colour, anchor, alpha=alpha)


def timestamp(img: Image.Image, where: str = "br", colour=(255, 160, 0)) -> list[int]:
    """A camera date stamp in a Hershey font (cv2.putText), as cameras burn them in."""
    arr = np.array(img)
    H, W = arr.shape[:2]
    text = "2019/07/14 18:42:07"
    scale = H / 700
    thick = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    m = max(8, W // 40)
    x = W - m - tw if where.endswith("r") else m
    y = H - m if where.startswith("b") else m + th
    cv2.putText(arr, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)
    img.paste(Image.fromarray(arr))
    return [x, y - th - thick, tw, th + base + thick]


def tiled(img: Image.Image, text: str, step: tuple[int, int], alpha: float = 0.3, angle: float = 0.0,
          colour=(255, 255, 255)) -> list[int]:
    """`text` repeated over the whole image, semi-transparent (optionally the whole layer turned by `angle`)."""
    W, H = img.size
    big = max(W, H) * 2 if angle else max(W, H)
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = _font(max(14, H // 18))
    for y in range(0, big, step[1]):
        for x in range(-(y // step[1] % 2) * step[0] // 2, big, step[0]):
            draw.text((x, y), text, font=font, fill=(*colour, round(255 * alpha)))
    if angle:
        layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC)
        left, top = (big - W) // 2, (big - H) // 2
        layer = layer.crop((left, top, left + W, top + H))
    else:
        layer = layer.crop((0, 0, W, H))
    img.paste(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"))
    return [0, 0, W, H]


def planted_set() -> list[tuple[str, Image.Image, str, list[int]]]:
    """(name, image, kind, box): at least 24 overlays over several photos, sizes, colours and places."""
    out = []
    n = 0

    def base() -> Image.Image:
        nonlocal n
        img = photo(BASES[n % len(BASES)], SIZES[n % len(SIZES)])
        n += 1
        return img

    lines = ["I never thought we'd get this far.", "Where are you going tonight?", "THE END", "- Look out behind you!",
             "We have to leave now", "Subtitles by someone"]
    for i, text in enumerate(lines):
        img = base()
        colour = [(255, 255, 255), (255, 240, 80)][i % 2]
        out.append((f"sub{i}", img, "band", subtitle(img, text, colour, band=i % 3 == 2, top=i == 5)))
    signs = [("@artist_name", "br"), ("(c) Jane Doe 2024", "bl"), ("studio-lumen.com", "tr"), ("@pixel.witch", "tl"),
             ("J. Smith", "br"), ("photo by Kim", "bl"), ("NOT FOR SALE", "tr"), ("dreamshots.net", "br")]
    colours = [(255, 255, 255), (20, 20, 20), (230, 40, 40), (255, 255, 255)]
    for i, (text, where) in enumerate(signs):
        img = base()
        out.append((f"sign{i}", img, "corner", corner(img, text, where, colours[i % 4], alpha=[1.0, 0.75, 0.6][i % 3],
                                                      scale=[1 / 22, 1 / 28, 1 / 18][i % 3])))
    for i, (where, colour) in enumerate([("br", (255, 160, 0)), ("tl", (255, 200, 40)), ("bl", (255, 255, 255)),
                                         ("tr", (255, 120, 0)), ("br", (240, 240, 60))]):
        img = base()
        out.append((f"stamp{i}", img, "corner", timestamp(img, where, colour)))
    for i, (text, step, alpha, angle) in enumerate([("SAMPLE", (180, 90), 0.3, 0), ("(c) stock", (150, 110), 0.25, 30),
                                                     ("PREVIEW", (200, 120), 0.35, -25), ("watermark", (170, 80), 0.3, 0),
                                                     ("DO NOT COPY", (230, 130), 0.3, 20)]):
        img = base()
        out.append((f"tile{i}", img, "tiled", tiled(img, text, step, alpha, angle, [(255, 255, 255), (0, 0, 0)][i % 2])))
    return out


def video_frames(folder: Path, n: int = 8, logo: str = "CH 7 NEWS") -> list[int]:
    """`n` frames of a camera pan across coffee (named like `dataset frames` writes them) with a logo that stays put;
    returns the logo's box."""
    folder.mkdir(parents=True, exist_ok=True)
    scene = photo("coffee", (1200, 800))
    box: list[int] = []
    for i in range(n):
        x = 40 + i * 70
        frame = scene.crop((x, 60 + i * 10, x + 640, 60 + i * 10 + 480))
        box = corner(frame, logo, "tr", (255, 255, 255), alpha=0.85, scale=1 / 20)
        frame.save(folder / f"clip_{i * 500:08d}ms.png")
    return box


def overlap(found: list[int], truth: list[int]) -> tuple[float, float]:
    """(share of the truth covered by `found`, share of `found` that is truth)."""
    x0, y0 = max(found[0], truth[0]), max(found[1], truth[1])
    x1, y1 = min(found[0] + found[2], truth[0] + truth[2]), min(found[1] + found[3], truth[1] + truth[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / max(1, truth[2] * truth[3]), inter / max(1, found[2] * found[3])
