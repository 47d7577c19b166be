#!/usr/bin/env python3
"""Reference outputs of FixMatch's RandAugment operations, computed with Pillow, for
tests/randaugment.rs (an implementation independent of ours: the FixMatch reference code calls
these Pillow functions).

Pinned: Python 3.11, Pillow 13.0.0, numpy 2.4.6 (x86-64 wheels). Regenerate with
    python3 -m venv /tmp/pillow-venv
    /tmp/pillow-venv/bin/pip install pillow==13.0.0 numpy==2.4.6
    /tmp/pillow-venv/bin/python scripts/randaugment-fixtures.py
which rewrites tests/fixtures/randaugment/{index.json,images.bin}.

images.bin holds uint8 images, each planar C x H x W; index.json names, for every record, the
input, the operation, its magnitude (in the op's own units, an exact float32 value), and the
byte offset of the output. Record "input" is the input image itself.
"""

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "randaugment")
GREY = 127


def f32(v):
    """The float32 value nearest to v, as a Python float (so that Rust sees the same number)."""
    return float(np.float32(v))


def inputs():
    """Deterministic textured images: gradients, stripes and noise, within [18, 231] so that
    AutoContrast and Equalize change them too."""
    rng = np.random.default_rng(20)
    out = {}
    for name, c, h, w in [("grey28", 1, 28, 28), ("rgb32", 3, 32, 32), ("rgb24x40", 3, 24, 40)]:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        planes = []
        for k in range(c):
            v = 120 + 60 * np.sin(x / (2.5 + k) + y / 7.0) + 40 * np.cos(y / (3.0 + k)) * (x / w)
            v += rng.normal(0, 12, size=(h, w))
            v[(y > h / 3) & (y < h / 2) & (x > w / 4) & (x < 3 * w / 4)] = 200 - 40 * k  # a block edge
            planes.append(np.clip(np.round(v), 18, 231).astype(np.uint8))
        out[name] = np.stack(planes)
    return out


def to_pil(a):
    return Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), "RGB")


def from_pil(im):
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def fill(im):
    return GREY if im.mode == "L" else (GREY,) * 3


def affine(im, m):
    return im.transform(im.size, Image.AFFINE, m, resample=Image.NEAREST, fillcolor=fill(im))


OPS = {
    "Identity": ([0.0], lambda im, m: im.copy()),
    "AutoContrast": ([0.0], lambda im, m: ImageOps.autocontrast(im)),
    "Equalize": ([0.0], lambda im, m: ImageOps.equalize(im)),
    "Rotate": ([-30.0, -12.5, 23.7], lambda im, m: im.rotate(m, resample=Image.NEAREST, fillcolor=fill(im))),
    # Pixel threshold floor(256 t): pixels >= it are inverted (t = 1: none).
    "Solarize": ([0.0, 0.3, 0.75], lambda im, m: ImageOps.solarize(im, math.floor(256 * m))),
    "Color": ([0.05, 0.5, 0.95], lambda im, m: ImageEnhance.Color(im).enhance(m)),
    "Posterize": ([4.0, 5.0, 7.0], lambda im, m: ImageOps.posterize(im, int(m))),
    "Contrast": ([0.05, 0.5, 0.95], lambda im, m: ImageEnhance.Contrast(im).enhance(m)),
    "Brightness": ([0.05, 0.5, 0.95], lambda im, m: ImageEnhance.Brightness(im).enhance(m)),
    "Sharpness": ([0.05, 0.5, 0.95], lambda im, m: ImageEnhance.Sharpness(im).enhance(m)),
    "ShearX": ([-0.3, -0.1, 0.23], lambda im, m: affine(im, (1, m, 0, 0, 1, 0))),
    "ShearY": ([-0.3, -0.1, 0.23], lambda im, m: affine(im, (1, 0, 0, m, 1, 0))),
    "TranslateX": ([-0.3, -0.1, 0.23], lambda im, m: affine(im, (1, 0, m * im.size[0], 0, 1, 0))),
    "TranslateY": ([-0.3, -0.1, 0.23], lambda im, m: affine(im, (1, 0, 0, 0, 1, m * im.size[1]))),
}

# Cutout (cy, cx, side): rows cy - side // 2 .. + side and the same columns, clipped to the image.
CUTOUTS = [(10, 12, 8), (1, 2, 9), (20, 25, 13)]


def cutout(im, cy, cx, side):
    im = im.copy()
    y0, x0 = cy - side // 2, cx - side // 2
    y1, x1 = min(im.size[1], y0 + side) - 1, min(im.size[0], x0 + side) - 1  # inclusive corner
    y0, x0 = max(0, y0), max(0, x0)
    if y1 >= y0 and x1 >= x0:
        ImageDraw.Draw(im).rectangle((x0, y0, x1, y1), fill=fill(im))
    return im


def main():
    os.makedirs(OUT, exist_ok=True)
    blob, records = bytearray(), []

    def add(inp, op, mag, a, extra=None):
        c, h, w = a.shape
        rec = {"input": inp, "op": op, "magnitude": mag, "offset": len(blob), "c": c, "h": h, "w": w}
        rec.update(extra or {})
        records.append(rec)
        blob.extend(np.ascontiguousarray(a, dtype=np.uint8).tobytes())

    for name, a in inputs().items():
        add(name, "input", 0.0, a)
        im = to_pil(a)
        for op, (mags, fn) in OPS.items():
            for m in mags:
                m = f32(m)
                out = from_pil(fn(im, m))
                assert out.shape == a.shape, (op, out.shape)
                if op not in ("Identity",) and not (op == "Color" and a.shape[0] == 1):
                    assert (out != a).any(), f"{op}({m}) leaves {name} unchanged"
                add(name, op, m, out)
        for cy, cx, side in CUTOUTS:
            add(name, "Cutout", float(side), from_pil(cutout(im, cy, cx, side)), {"cy": cy, "cx": cx})
    import PIL

    meta = {"pillow": PIL.__version__, "numpy": np.__version__, "grey": GREY, "records": records}
    with open(os.path.join(OUT, "images.bin"), "wb") as f:
        f.write(bytes(blob))
    with open(os.path.join(OUT, "index.json"), "w") as f:
        # One record a line: small, and diffs name the record that changed.
        head = json.dumps({k: v for k, v in meta.items() if k != "records"})[:-1]
        f.write(head + ', "records": [\n' + ",\n".join(json.dumps(r) for r in records) + "\n]}\n")
    print(f"{len(records)} records, {len(blob)} bytes")


if __name__ == "__main__":
    main()
