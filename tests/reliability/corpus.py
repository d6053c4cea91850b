"""A generated corpus of bad and unusual image files (nothing committed).

`make_corpus(folder)` writes every file and returns ``{name: expected}``:
``"ok"`` for files every component must handle correctly (alpha dropped,
grayscale and palette expanded, 16-bit reduced to 8 bits, CMYK converted,
EXIF orientation ignored everywhere alike, tiny images upscaled with the
rest), and ``"error"`` for files that must be reported, per item, with the
file and the reason (among them decompression bombs in PNG, WebP and GIF
frames, JPEG XL, which is refused, a FIFO and a link to ``/dev/zero``).
The names ``NA`` and ``007`` (no extension: a folder walk skips them, a CSV
names them) and one holding a carriage return must be kept verbatim. Names are ``str``; the non-UTF-8 one is returned as
Python decodes it from the file system (surrogate escapes).
"""

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

from tests.helpers_images import gif_frames_bomb, webp_declaring

BOMB_SIDE = 50000


def _photo(width, height, seed=0):
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (max(1, height // 8), max(1, width // 8), 3)).astype(np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def _jpeg(image, **kwargs):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side=BOMB_SIDE):
    """A PNG whose header declares ``side x side`` RGB pixels (7.5 GB decoded
    at 50000), with a few rows of zeros: small on disk, a decompression bomb
    for any decoder that trusts the header."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((side * 3 + 1) * 4), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def make_corpus(folder, huge_side=6000):
    """Writes the corpus into ``folder``; returns ``{file name: "ok"|"error"}``."""
    os.makedirs(folder, exist_ok=True)
    files = {}

    def put(name, data, expected):
        with open(os.path.join(os.fsencode(folder), os.fsencode(name)), "wb") as f:
            f.write(data)
        files[name] = expected

    good = _jpeg(_photo(200, 150, 1))
    put("truncated.jpg", good[: len(good) // 2], "error")
    put("empty.jpg", b"", "error")
    put("random_bytes.jpg", np.random.RandomState(2).bytes(5000), "error")
    put("text.png", b"this is not an image\n" * 20, "error")
    put("bomb.png", bomb_png(), "error")
    put("bomb.webp", webp_declaring(16383, 16383), "error")  # 10 KB files like it decode to 800 MB
    put("frames_bomb.gif", gif_frames_bomb(3000, 60), "error")  # 60 frames of 9 MP: TF decodes them all
    put("jpeg_xl.png", b"\xff\x0a" + bytes(60), "error")  # JPEG XL: no size check, refused

    def png(image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    rgba = _photo(180, 120, 3).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 180, dtype=np.uint8), (120, 1))))
    put("alpha.png", png(rgba), "ok")
    put("grayscale.png", png(_photo(160, 160, 4).convert("L")), "ok")
    put("palette.png", png(_photo(150, 200, 5).convert("P", palette=Image.ADAPTIVE, colors=64)), "ok")
    deep = (np.asarray(_photo(170, 130, 6).convert("L"), np.uint16) * 257).astype(">u2")
    put("gray16.png", png(Image.frombytes("I;16B", (170, 130), deep.tobytes())), "ok")
    put("cmyk.jpg", _jpeg(_photo(190, 140, 7).convert("CMYK")), "ok")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    put("exif_rotated.jpg", _jpeg(_photo(240, 160, 8), exif=exif.tobytes()), "ok")
    put("one_pixel.png", png(Image.new("RGB", (1, 1), (200, 10, 10))), "ok")
    put("below_stride.png", png(_photo(9, 7, 9)), "ok")
    put("huge.jpg", _jpeg(_photo(huge_side, huge_side * 2 // 3, 10)), "ok")
    put(os.fsdecode(b"caf\xe9_latin1.jpg"), _jpeg(_photo(120, 90, 11)), "ok")
    put("plain.jpg", good, "ok")
    # Names a CSV reader must keep verbatim, and one that would split a row.
    put("NA", _jpeg(_photo(100, 80, 12)), "ok")
    put("007", _jpeg(_photo(80, 100, 13)), "ok")
    put("line\rbreak.jpg", _jpeg(_photo(90, 90, 14)), "ok")
    # Not regular files: reading a FIFO blocks forever, /dev/zero never ends.
    os.mkfifo(os.path.join(folder, "pipe.jpg"))
    files["pipe.jpg"] = "error"
    os.symlink("/dev/zero", os.path.join(folder, "zero.jpg"))
    files["zero.jpg"] = "error"
    return files
