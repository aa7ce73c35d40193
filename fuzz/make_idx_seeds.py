#!/usr/bin/env python3
"""Writes the seed inputs of fuzz_idx (fuzz/fuzz_idx.c describes the format)
to fuzz/corpus/idx/. Run from anywhere: python3 fuzz/make_idx_seeds.py"""
import gzip
import os
import struct

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "idx")
os.makedirs(out, exist_ok=True)


def images(n, h, w):
    pixels = bytes((i * 37 + 11) % 256 for i in range(n * h * w))
    return struct.pack(">IIII", 0x803, n, h, w) + pixels


def labels(n):
    return struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))


def seed(name, image_file, label_file, flags=0):
    data = bytes([flags]) + struct.pack(">H", len(image_file)) + image_file + label_file
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


seed("valid-13x5x7", images(13, 5, 7), labels(13))
seed("valid-1x1x1", images(1, 1, 1), labels(1))
seed("valid-crop-flip", images(6, 4, 4), labels(6), flags=(2 << 2) | (1 << 5))
seed("crop-too-large", images(3, 2, 3), labels(3), flags=7 << 2)
# Given as gzip files (flags 1 and 2: the target writes them unchanged).
seed("gzipped", gzip.compress(images(4, 3, 3), mtime=0), gzip.compress(labels(4), mtime=0), 3)
seed("gzip-truncated", gzip.compress(images(4, 3, 3), mtime=0)[:-6], gzip.compress(labels(4), mtime=0), 3)
seed("not-gzip", images(2, 2, 2), labels(2), flags=3)
seed("swapped", labels(3), images(3, 2, 2))
seed("count-mismatch", images(3, 2, 2), labels(4))
seed("bad-label", images(2, 2, 2), struct.pack(">II", 0x801, 2) + bytes([3, 10]))
seed("trailing-bytes", images(2, 2, 2) + b"xyz", labels(2))
seed("huge-header", struct.pack(">IIII", 0x803, 1 << 30, 1 << 14, 1 << 14), labels(1))
seed("zero-dims", struct.pack(">IIII", 0x803, 0, 5, 5), labels(0))
