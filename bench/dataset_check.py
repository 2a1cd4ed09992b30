"""`loratrain dataset check` time per image: the checks it always had against the ones that look at pixels again.

The old checks (corrupt, sizes, blur, duplicates, captions, tags) cost one measuring pass; text_marks / video_marks
(stroke maps, text lines, a tiled-watermark search) and people / shot_balance (dlib HOG face detection and
landmarks) decode every image again and do far more with it. All modes run on the same folder in the same process,
interleaved over rounds (these machines are noisy); each mode's time includes the measuring pass, and the ratios
are against the old checks of the same round (medians reported), with the peak resident memory of each mode.

The folder: scikit-image's photos cropped and scaled to a long side of `--side` px (a different crop each time,
so they are not duplicates), a caption each, and every third image with a planted overlay (a subtitle, a corner
signature or a tiled watermark), in a temporary folder removed afterwards.

    python bench/dataset_check.py                  # 48 images at 1024 px, 2 workers, 2 rounds
    python bench/dataset_check.py --images 200 --workers 4
    python bench/dataset_check.py --tiny           # a few small images, one round: does it run at all
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from benchutil import PeakRss
from PIL import Image, ImageDraw, ImageFont

from loratrain.core.progress import NullReporter
from loratrain.dataset_tools.quality.checks import CHECKS
from loratrain.dataset_tools.quality.config import CheckConfig
from loratrain.dataset_tools.quality.report import run_check

NEW = ("text_marks", "video_marks", "people", "shot_balance", "extension_mismatch")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "brick", "grass",
          "coins", "clock", "moon", "gravel", "hubble_deep_field", "retina")
SHAPES = ((4, 3), (3, 4), (1, 1), (3, 2))


def photo(i: int, side: int) -> Image.Image:
    """The i-th photo: a crop of 70-100 % of a scikit-image photo, scaled to `side` on its long side."""
    from skimage import data

    arr = getattr(data, PHOTOS[i % len(PHOTOS)])()
    if arr.dtype != np.uint8:
        arr = (arr * 255).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    rng = np.random.default_rng(i)
    share = rng.uniform(0.7, 1.0)
    w, h = round(img.width * share), round(img.height * share)
    x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    aw, ah = SHAPES[i % len(SHAPES)]
    size = (side, round(side * ah / aw)) if aw >= ah else (round(side * aw / ah), side)
    return img.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.LANCZOS)


def plant(img: Image.Image, kind: int) -> None:
    """A subtitle (0), a corner signature (1) or a tiled watermark (2), drawn over `img` in place."""
    W, H = img.size
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    if kind == 0:
        px = max(12, H // 16)
        draw.text((W // 2, H - H // 16), "Where are you going tonight?", font=ImageFont.load_default(size=px),
                  fill=(255, 255, 255, 255), anchor="mb", stroke_width=max(1, px // 14), stroke_fill=(0, 0, 0, 255))
    elif kind == 1:
        px = max(10, H // 24)
        draw.text((W - W // 40, H - H // 40), "@artist_name 2024", font=ImageFont.load_default(size=px),
                  fill=(255, 255, 255, 230), anchor="rb")
    else:
        font = ImageFont.load_default(size=max(10, H // 18))
        step_x, step_y = max(40, W // 5), max(20, H // 9)
        for y in range(0, H, step_y):
            for x in range(-(y // step_y % 2) * step_x // 2, W, step_x):
                draw.text((x, y), "SAMPLE", font=font, fill=(255, 255, 255, 80))
    img.paste(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB"))


def build(root: Path, n: int, side: int) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        img = photo(i, side)
        if i % 3 == 2:
            plant(img, (i // 3) % 3)
        name = f"img{i:04d}"
        if i % 2:
            img.save(root / f"{name}.jpg", quality=92)
        else:
            img.save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"photo, {PHOTOS[i % len(PHOTOS)]}, tag_{i % 7}", encoding="utf-8")


def run(root: Path, checks: list[str], workers: int) -> tuple[float, int, int]:
    """(seconds, images, findings) of one `dataset check` over `root` with `checks`."""
    cfg = CheckConfig(dataset_dir=str(root), checks=checks, workers=workers, quiet=True)
    t = time.perf_counter()
    report = run_check(cfg, NullReporter())
    return time.perf_counter() - t, report.images, len(report.findings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--side", type=int, default=1024, help="long side of the images, px")
    ap.add_argument("--workers", type=int, default=2, help="dataset check --workers")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="6 images of 256 px, one round (the smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.side, args.rounds = 6, 256, 1

    old = [name for name in CHECKS.names() if name not in NEW]
    modes = {"old checks": old, "+ text/video marks": old + ["text_marks", "video_marks"],
             "+ people/shot balance": old + ["people", "shot_balance"], "all (default)": list(CHECKS.names())}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        build(root, args.images, args.side)
        print(f"{args.images} images, long side {args.side} px | workers {args.workers} | rounds {args.rounds} | "
              f"old checks: {', '.join(old)}")
        build(Path(tmp) / "warm", 1, args.side)
        run(Path(tmp) / "warm", list(CHECKS.names()), args.workers)  # warm-up: imports, dlib's models
        run(root, ["corrupt"], args.workers)  # ... and the page cache
        ms: dict[str, list[float]] = {m: [] for m in modes}
        peaks = {m: 0 for m in modes}
        for r in range(args.rounds):
            for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                with PeakRss() as rss:
                    seconds, images, findings = run(root, modes[mode], args.workers)
                peaks[mode] = max(peaks[mode], rss.peak)
                ms[mode].append(1000 * seconds / max(1, images))
            print(f"round {r + 1}: " + " | ".join(f"{m} {ms[m][-1]:.1f} ms/img" for m in modes))
        print("median per image (ratio to the old checks of the same round):")
        for m in modes:
            ratio = statistics.median(a / b for a, b in zip(ms[m], ms["old checks"]))
            print(f"  {m:24s} {statistics.median(ms[m]):8.1f} ms/img  ratio {ratio:6.2f}  "
                  f"peak RSS {peaks[m] / 2 ** 20:.0f} MiB")


if __name__ == "__main__":
    main()
