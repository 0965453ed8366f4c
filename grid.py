"""Labelled picture grids: what a person looks at to see whether a run works.

save_grid() lays images out in rows and columns, writes each column's title (the prompt) above
it, an optional caption under each image (a score, a step) and an optional pass/fail mark (a green
or red frame, with a tick or a cross under the image, never over it), enlarging small images with nearest-neighbour so the built-in
world's 32 px boards stay sharp and readable. Used by train.py's sample grids, rollout.py's chain
picture and eval.py's results. Test: tests/test_rollout.py (the chain picture).
"""
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PASS, FAIL, INK = (30, 160, 60), (210, 40, 40), (20, 20, 20)


def _font(size):
    try:
        return ImageFont.load_default(size=size)           # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def save_grid(path, images, ncol, titles=None, captions=None, marks=None, cell=128, row_titles=None, heading=None):
    """images (N, 3, H, W) in [0, 1], row-major with ncol columns; titles: ncol strings above
    the columns; captions: N strings under the images; marks: N of True (pass), False (fail) or
    None (no mark); row_titles: one string per row, left of it; heading: one line above all.
    Writes a PNG to path."""
    images = images.detach().float().cpu().clamp(0, 1)
    n = len(images)
    nrow = -(-n // ncol)
    scale = max(1, cell // images.shape[-1])
    side = images.shape[-1] * scale
    font = _font(max(11, side // 10))
    line = font.getbbox("Ag")[3] + 3
    chars = max(8, int(side / (font.getlength("m") * 0.75)))
    wrapped = [textwrap.wrap(t, chars) or [""] for t in (titles or [])]
    top = line + 4 if heading else 0
    head = top + ((max(len(w) for w in wrapped) * line + 6) if titles else 4)
    foot = (line + 4) if captions or marks is not None else 0      # the tick or cross sits under the board
    left = (max(font.getlength(t) for t in row_titles) + 10) if row_titles else 0
    pad, frame = 6, 3
    W = int(left + ncol * (side + 2 * frame + pad) + pad)
    H = int(head + nrow * (side + 2 * frame + foot + pad) + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    if heading:
        draw.text((pad, 2), heading, fill=INK, font=font)
    for c, lines in enumerate(wrapped):
        x = left + pad + c * (side + 2 * frame + pad)
        for k, text in enumerate(lines):
            draw.text((x + frame, top + 3 + k * line), text, fill=INK, font=font)
    for i in range(n):
        r, c = divmod(i, ncol)
        x = int(left + pad + c * (side + 2 * frame + pad))
        y = int(head + r * (side + 2 * frame + foot + pad))
        mark = marks[i] if marks is not None else None
        if mark is not None:
            draw.rectangle([x, y, x + side + 2 * frame - 1, y + side + 2 * frame - 1], fill=PASS if mark else FAIL)
        pixels = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(pixels).resize((side, side), Image.NEAREST), (x + frame, y + frame))
        offset = 0
        if mark is not None:       # a tick or a cross under the board (over it, it hid a corner cell: the 4th object
            s = min(max(8, side // 8), line - 4)               # of a "four ..." prompt), drawn: no glyph font needed
            x0, y0 = x + frame, y + side + 2 * frame + 3
            offset = s + 6
            if mark:
                draw.line([(x0, y0 + s // 2), (x0 + s // 3, y0 + s), (x0 + s, y0)], fill=PASS, width=2)
            else:
                draw.line([(x0, y0), (x0 + s, y0 + s)], fill=FAIL, width=2)
                draw.line([(x0, y0 + s), (x0 + s, y0)], fill=FAIL, width=2)
        if captions:
            draw.text((x + frame + offset, y + side + 2 * frame + 1), captions[i], fill=INK, font=font)
    for r, text in enumerate(row_titles or []):
        y = head + r * (side + 2 * frame + foot + pad) + side // 2
        draw.text((4, y), text, fill=INK, font=font)
    canvas.save(path)
    return canvas

