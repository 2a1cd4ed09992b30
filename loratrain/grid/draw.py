"""Grid images with row/column labels that wrap and shrink to fit, as A1111 draws them.

Font size starts at (cell_w + cell_h) // 25; each label is word-wrapped to its box and any line still
too wide shrinks the font a point at a time, so labels stay legible at any cell size and never
overlap. The font is Pillow's bundled scalable font (no system fonts, works offline).
"""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = "white"
TEXT = "black"


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, size))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    l, _, r, _ = draw.textbbox((0, 0), text, font=font)
    return r - l


def wrap(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> tuple[list[str], int]:
    """Lines of `text` fitting `width` and the font size they need."""
    while True:
        font = _font(size)
        lines: list[str] = []
        for para in text.split("\n"):
            line = ""
            for word in para.split(" "):
                trial = f"{line} {word}".strip()
                if line and _text_width(draw, trial, font) > width:
                    lines.append(line)
                    line = word
                else:
                    line = trial
            lines.append(line)
        if size <= 6 or all(_text_width(draw, ln, font) <= width for ln in lines):
            return lines, size
        size -= 1


def _block_height(lines: list[str], size: int) -> int:
    return len(lines) * (size + size // 2)


def _draw_block(draw: ImageDraw.ImageDraw, lines: list[str], size: int, cx: float, cy: float) -> None:
    font = _font(size)
    step = size + size // 2
    y = cy - _block_height(lines, size) / 2 + step / 2
    for ln in lines:
        draw.text((cx, y), ln, font=font, fill=TEXT, anchor="mm")
        y += step


def draw_grid(cells: list[Image.Image | None], cols: int, rows: int, col_labels: list[str], row_labels: list[str],
              cell_size: tuple[int, int], margin: int = 0, title: str = "") -> Image.Image:
    """Cells row-major (None = not generated, drawn blank), labels on top and left, optional title."""
    cw, ch = cell_size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = max(8, (cw + ch) // 25)
    line = size // 2
    col_wrapped = [wrap(probe, t, cw, size) for t in col_labels] if any(col_labels) else []
    left = (cw * 3) // 4 if any(row_labels) else 0
    row_wrapped = [wrap(probe, t, max(left - 2 * line, 8), size) for t in row_labels] if left else []
    title_wrapped = wrap(probe, title, cols * cw, size) if title else None
    title_h = _block_height(*title_wrapped) + 2 * line if title_wrapped else 0
    top = (max(_block_height(ls, s) for ls, s in col_wrapped) + 2 * line if col_wrapped else 0) + title_h
    width = left + cols * cw + (cols - 1) * margin
    height = top + rows * ch + (rows - 1) * margin
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if title_wrapped:
        _draw_block(draw, title_wrapped[0], title_wrapped[1], left + (width - left) / 2, title_h / 2)
    for c, (lines, s) in enumerate(col_wrapped):
        _draw_block(draw, lines, s, left + c * (cw + margin) + cw / 2, title_h + (top - title_h) / 2)
    for r, (lines, s) in enumerate(row_wrapped):
        _draw_block(draw, lines, s, left / 2, top + r * (ch + margin) + ch / 2)
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        r, c = divmod(i, cols)
        x0, y0 = left + c * (cw + margin), top + r * (ch + margin)
        img.paste(cell, (x0 + (cw - cell.width) // 2, y0 + (ch - cell.height) // 2))  # smaller cells centred, never scaled
    return img


def side_by_side(images: list[Image.Image], gap: int) -> Image.Image:
    """The Z sheet: sub-grids in one row, top-aligned."""
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width + gap
    return sheet
