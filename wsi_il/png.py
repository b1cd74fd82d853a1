"""Encode an RGB image as PNG with its compression split over several threads.

A PNG holds one zlib stream, so encoders compress it on one core; a large picture (the contact sheet of a batch
of context images, several megapixels) then bounds the writing of a batch however many cores there are. Here
the rows are cut into stripes, each filtered and deflated on its own (``encode_stripe``, which leaves the
interpreter lock free while zlib works) and ended on a byte boundary with a sync flush, so that the stripes
joined are one valid deflate stream (as ``pigz`` does); the zlib checksum of the whole is combined from the
stripes' own. Every row uses PNG's "Up" filter (the difference with the row above, computed by numpy), which
compresses photographs of tissue nearly as well as an adaptive choice for a fraction of its time.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP_FILTER = 2
_ADLER_BASE = 65521


@dataclass(frozen=True)
class Stripe:
    """One stripe of rows, filtered and deflated."""

    data: bytes
    """Raw deflate blocks, ended by a sync flush (by the final block for the last stripe)."""
    adler32: int
    """zlib's Adler-32 of the stripe's filtered bytes."""
    length: int
    """How many filtered bytes the stripe holds."""


def stripe_bounds(height: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``height`` rows into at most ``parts`` stripes of about equal height, (start, stop) each."""
    edges = np.linspace(0, height, max(1, min(parts, height)) + 1).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))


def encode_stripe(rgb: np.ndarray, start: int, stop: int, level: int) -> Stripe:
    """Filter rows ``start`` to ``stop`` of the (height, width, 3) uint8 ``rgb`` and deflate them at ``level``."""
    height, width, _ = rgb.shape
    rows = rgb[start:stop].reshape(stop - start, width * 3)
    filtered = np.empty((stop - start, width * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = _UP_FILTER
    if start == 0:
        filtered[0, 1:] = rows[0]  # the first row's row above is zeros
    else:
        np.subtract(rows[0], rgb[start - 1].reshape(-1), out=filtered[0, 1:])
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps around, as PNG's does
    data = filtered.data
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = compressor.compress(data) + compressor.flush(zlib.Z_FINISH if stop == height else zlib.Z_SYNC_FLUSH)
    return Stripe(body, zlib.adler32(data), filtered.size)


def assemble(width: int, height: int, stripes: list[Stripe]) -> bytes:
    """The PNG file of an RGB image from all its stripes, in order."""
    stream = b"\x78\x01" + b"".join(s.data for s in stripes) + struct.pack(">I", _combined_adler32(stripes))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, adaptive, no interlace
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def encode(rgb: np.ndarray, level: int, parts: int = 1) -> bytes:
    """The PNG file of the (height, width, 3) uint8 ``rgb``, its stripes encoded one after the other."""
    height, width, _ = rgb.shape
    return assemble(width, height, [encode_stripe(rgb, a, b, level) for a, b in stripe_bounds(height, parts)])


def _combined_adler32(stripes: list[Stripe]) -> int:
    """Adler-32 of the stripes' bytes joined, from each stripe's own (zlib's ``adler32_combine``)."""
    low, high = 1, 0
    for stripe in stripes:
        part_low, part_high = stripe.adler32 & 0xFFFF, stripe.adler32 >> 16
        high = (high + part_high + (low - 1) * stripe.length) % _ADLER_BASE
        low = (low + part_low - 1) % _ADLER_BASE
    return (high << 16) | low


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
