"""Draws Files/9.png: a 9 as a person draws it on the page's canvas.

    python tests/make_sample_digit.py [--out Files/9.png]

The strokes match the front-end's canvas (Files/static/app.js): 280x280, dark ink
(#111111) on white paper, a 20 px pen with round caps and joins, anti-aliased. Like a
hand-drawn digit, and unlike an MNIST one, it is not centred and not fitted to 20x20:
the back-end's preprocessing inverts, crops, scales and centres it.

Made by the project rather than downloaded, so the file's origin is known; a test
checks that the committed Files/9.png is what this script draws.
"""
import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

CANVAS = 280
LINE_WIDTH = 20  # app.js LINE_WIDTH
INK = (0x11, 0x11, 0x11)  # app.js INK
PAPER = (255, 255, 255)  # app.js PAPER
SUPERSAMPLE = 4  # draw 4x larger, then average down: anti-aliased edges like a browser's
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "Files" / "9.png"


def nine_strokes():
    """One pen stroke, as a person draws a 9: round the loop anticlockwise from its
    right side, then down the stem, curving a little to the left."""
    cx, cy, rx, ry, tilt = 150.0, 98.0, 46.0, 40.0, math.radians(-8)
    points = []
    for step in range(0, 373, 6):  # a little over a full turn closes the loop
        t = math.radians(step - 8)
        x, y = rx * math.cos(t), -ry * math.sin(t)
        points.append((cx + x * math.cos(tilt) - y * math.sin(tilt), cy + x * math.sin(tilt) + y * math.cos(tilt)))
    # The stem: a quadratic curve from the loop's right side down and a little to the left.
    (x0, y0), (x1, y1), (x2, y2) = points[-1], (194.0, 175.0), (172.0, 236.0)
    for i in range(1, 21):
        u = i / 20
        points.append(
            (
                (1 - u) ** 2 * x0 + 2 * (1 - u) * u * x1 + u**2 * x2,
                (1 - u) ** 2 * y0 + 2 * (1 - u) * u * y1 + u**2 * y2,
            )
        )
    return [points]


def draw_nine(size=CANVAS, line_width=LINE_WIDTH):
    """The 9 as an RGB image, dark ink on white paper."""
    scale = SUPERSAMPLE * size / CANVAS
    big = size * SUPERSAMPLE
    width = round(line_width * scale)
    ink = Image.new("L", (big, big), 0)  # coverage: 255 where the pen went
    pen = ImageDraw.Draw(ink)
    for stroke in nine_strokes():
        path = [(x * scale, y * scale) for x, y in stroke]
        pen.line(path, fill=255, width=width, joint="curve")
        for x, y in (path[0], path[-1]):  # round caps
            pen.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    coverage = ink.resize((size, size), Image.Resampling.BOX)
    return Image.composite(Image.new("RGB", (size, size), INK), Image.new("RGB", (size, size), PAPER), coverage)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write the PNG (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    draw_nine().save(args.out, "PNG", optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
