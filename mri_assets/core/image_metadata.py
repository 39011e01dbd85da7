"""PNG and JPEG metadata removed without touching the compressed pixels.

A viewer's export can carry the patient's name in a PNG text chunk or a JPEG comment, EXIF or
XMP segment. Both formats are containers of independent chunks/segments before (PNG: around)
the compressed image, so the metadata is cut out and every other byte is kept as it was: the
pixels decode to the same values.

- PNG: `tEXt`, `zTXt`, `iTXt`, `eXIf` and `tIME` chunks are dropped (each chunk carries its own
  CRC, so the others stay valid).
- JPEG: before the first scan, `COM` and every `APPn` segment are dropped except `APP0` (JFIF),
  `APP2` (ICC colour profile) and `APP14` (Adobe colour transform), which decoding may need.
"""

from __future__ import annotations

import struct

from mri_assets.core.unreadable import UnreadableImage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_METADATA_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"})
JPEG_KEPT_APP = frozenset({0xE0, 0xE2, 0xEE})
_JPEG_COM = 0xFE
_JPEG_SOS = 0xDA
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def scrub_png(data: bytes) -> bytes:
    """The PNG without its text, EXIF and time chunks (the same object when it had none)."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    kept = [PNG_SIGNATURE]
    pos, dropped = len(PNG_SIGNATURE), False
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            break
        if kind in PNG_METADATA_CHUNKS:
            dropped = True
        else:
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    if not dropped:
        return data
    if pos < len(data) and kept[-1][4:8] != b"IEND":
        raise UnreadableImage("PNG with text chunks that ends inside a chunk: it cannot be "
                              "cleaned of its metadata; export the image again")
    return b"".join(kept)


def scrub_jpeg(data: bytes) -> bytes:
    """The JPEG without COM, EXIF, XMP and other application segments before its first scan
    (the same object when it had none)."""
    if not data.startswith(b"\xff\xd8"):
        return data
    kept = [data[:2]]
    pos, dropped = 2, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise UnreadableImage("JPEG whose segments cannot be walked before the image data: "
                                  "it cannot be cleaned of its metadata; export the image again")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            kept.append(data[pos : pos + 2])
            pos += 2
            continue
        if marker == _JPEG_SOS:
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if marker == _JPEG_COM or (0xE0 <= marker <= 0xEF and marker not in JPEG_KEPT_APP):
            dropped = True
        else:
            kept.append(data[pos:end])
        pos = end
    if not dropped:
        return data
    kept.append(data[pos:])
    return b"".join(kept)
