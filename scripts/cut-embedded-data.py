#!/usr/bin/env python3
"""Cuts the embedded default data set, data/fashion-mnist-10k/, from the official Fashion-MNIST files.

Source: Debian package `dataset-fashion-mnist` (apt-get install -y dataset-fashion-mnist), which ships
the official IDX gz files in /usr/share/datasets/fashion-mnist/. The cut keeps the FIRST 10,000
training and the FIRST 2,000 test images with their labels, in the same IDX format, gzipped with
mtime 0 and no file name so that the output bytes depend only on the input.

Usage: python3 scripts/cut-embedded-data.py [SOURCE_DIR] [OUT_DIR]
Python standard library only (gzip + struct + hashlib).
"""

import gzip
import hashlib
import os
import struct
import sys

TRAIN_N = 10_000
TEST_N = 2_000


def read_idx(path, ndims):
    """Returns (dims, payload) of an IDX gz file, checking the magic number and the length."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or nd != ndims:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file with {ndims} dimensions")
    dims = list(struct.unpack(">" + "I" * nd, data[4 : 4 + 4 * nd]))
    payload = data[4 + 4 * nd :]
    size = 1
    for d in dims:
        size *= d
    if len(payload) != size:
        raise SystemExit(f"{path}: payload is {len(payload)} bytes, header says {size}")
    return dims, payload


def cut(src, dst, stem, n):
    """Writes the first n records of `stem`'s images and labels to dst."""
    names = []
    for kind, ndims in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1)):
        name = f"{stem}-{kind}.gz"
        dims, payload = read_idx(os.path.join(src, name), ndims)
        if dims[0] < n:
            raise SystemExit(f"{name}: has {dims[0]} records, need {n}")
        per = len(payload) // dims[0]
        dims[0] = n
        header = struct.pack(">HBB", 0, 0x08, ndims) + struct.pack(">" + "I" * ndims, *dims)
        body = header + payload[: n * per]
        # mtime=0 and no file name in the header (gzip.compress writes none): deterministic bytes.
        with open(os.path.join(dst, name), "wb") as f:
            f.write(gzip.compress(body, compresslevel=9, mtime=0))
        names.append(name)
    return names


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "data", "fashion-mnist-10k")
    os.makedirs(dst, exist_ok=True)
    names = cut(src, dst, "train", TRAIN_N) + cut(src, dst, "t10k", TEST_N)
    for name in names:
        with open(os.path.join(dst, name), "rb") as f:
            print(f"{hashlib.sha256(f.read()).hexdigest()}  {name}")


if __name__ == "__main__":
    main()
