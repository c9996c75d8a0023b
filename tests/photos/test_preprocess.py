"""Decoding: odd but valid photos get sensible pixels; anything else is our own BadImageError."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from extendserve.config import PreprocessConfig
from extendserve.errors import BadImageError
from extendserve.photos.preprocess import decode, prepare

from conftest import bomb_png, header_only_jpeg, jpeg_bytes, synthetic_photo

CFG = PreprocessConfig()


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("data,msg", [
    (b"", "empty"),
    (b"%PDF-1.4\n1 0 obj", "not a recognised image format"),
    (b"<html><body>hi</body></html>", "not a recognised image format"),
    (bytes(range(256)) * 10, "not a recognised image format"),
])
def test_garbage_is_refused(data, msg):
    with pytest.raises(BadImageError, match=msg):
        prepare(data, CFG)


def test_truncated_jpeg_and_header_only():
    data = jpeg_bytes(synthetic_photo(0, 1))
    for cut in (data[:200], data[: len(data) // 2], header_only_jpeg()):
        with pytest.raises(BadImageError):
            prepare(cut, CFG)


def test_decompression_bomb_refused_from_header():
    im = Image.new("1", (30000, 30000))
    data = png(im, optimize=True)
    assert len(data) < 1_000_000
    with pytest.raises(BadImageError, match="over the limit|bomb"):
        prepare(data, CFG)
    with pytest.raises(BadImageError, match="over the limit|decompression bomb"):
        prepare(bomb_png(), CFG)  # a few hundred bytes that claim 900 megapixels


def phone_jpeg(side: int = 9000) -> bytes:
    """A 9000x9000 JPEG (81 MP, 1.3 MB): over the pixel limit at full size, not at 1/8 scale."""
    from PIL import ImageDraw

    im = Image.new("RGB", (side, side), (200, 60, 40))
    ImageDraw.Draw(im).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(30, 150, 60))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=30)
    return buf.getvalue()


def test_a_phone_sized_jpeg_is_decoded_at_reduced_scale_and_a_png_that_size_is_refused():
    from extendserve.photos.preprocess import MAX_PIXELS, decode

    big = phone_jpeg()
    assert 9000 * 9000 > MAX_PIXELS
    im = decode(big, "phone.jpg", CFG.resize)
    assert CFG.resize <= min(im.size) <= 9000 // 8  # libjpeg decoded it at 1/8 (then reduced by a whole factor)
    x = prepare(big, CFG)
    assert x.shape == (224, 224, 3) and x[112, 112, 1] > x[112, 112, 0]  # the green disc in the middle
    with pytest.raises(BadImageError, match="cannot be decoded at reduced scale; resize it or save it as JPEG"):
        prepare(bomb_png(9000, 9000), CFG)  # the same size as a PNG: nothing to reduce on decode
    with pytest.raises(BadImageError, match="over the limit"):
        decode(big, "phone.jpg")  # without a target size there is no reduced scale to decode at


def test_large_jpeg_takes_the_draft_path_and_matches_full_decode():
    from extendserve.photos.preprocess import decode, resize_crop

    big = jpeg_bytes(synthetic_photo(0, 5, size=(2048, 1536)))
    fast = decode(big, min_side=CFG.resize)
    assert max(fast.size) < 2048  # libjpeg scaled it down while decoding
    assert min(fast.size) >= CFG.resize
    diff = np.abs(resize_crop(fast, CFG).astype(int) - resize_crop(decode(big), CFG).astype(int))
    assert diff.mean() < 2.0
    small = jpeg_bytes(synthetic_photo(0, 5))
    assert np.array_equal(resize_crop(decode(small, min_side=CFG.resize), CFG), resize_crop(decode(small), CFG))


@pytest.mark.parametrize("size", [(1, 1), (1000, 3), (3, 1000), (224, 224)])
def test_odd_sizes(size):
    out = prepare(png(Image.new("RGB", size, (200, 10, 10))), CFG)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_16bit_grey_scaled_not_clipped():
    grey = np.asarray(synthetic_photo(0, 3).convert("L"))
    a8 = prepare(png(Image.fromarray(grey, "L")), CFG).astype(int)
    a16 = prepare(png(Image.fromarray(grey.astype(np.uint16) * 257)), CFG).astype(int)
    assert np.abs(a8 - a16).max() <= 1


def test_exif_orientation():
    upright = synthetic_photo(1, 7)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with the tag that says "rotate 90 clockwise to view"
    a = prepare(jpeg_bytes(upright), CFG).astype(int)
    b = prepare(jpeg_bytes(stored, exif=exif.tobytes()), CFG).astype(int)
    untagged = prepare(jpeg_bytes(stored), CFG).astype(int)
    assert np.abs(a - b).mean() < 8 < np.abs(a - untagged).mean()


def test_alpha_palette_cmyk_animation():
    rgba = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    out = prepare(png(rgba), CFG)
    assert abs(int(out[0, 0, 0]) - 124) < 3  # transparent -> neutral grey, not black or red
    pal = Image.new("P", (40, 40))
    pal.info["transparency"] = 0
    assert prepare(png(pal, transparency=0), CFG).shape == (224, 224, 3)
    cmyk = synthetic_photo(0, 2).convert("CMYK")
    assert prepare(jpeg_bytes(cmyk), CFG).shape == (224, 224, 3)
    frames = [Image.new("RGB", (60, 60), c) for c in ((0, 0, 255), (255, 0, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = prepare(buf.getvalue(), CFG)
    assert first[100, 100, 2] > 200 and first[100, 100, 0] < 50


SEED = jpeg_bytes(synthetic_photo(1, 11, (64, 48)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=2048),
    st.tuples(st.integers(0, len(SEED) - 1), st.binary(min_size=1, max_size=16)).map(
        lambda t: SEED[: t[0]] + t[1] + SEED[t[0] + len(t[1]):]),
    st.integers(1, len(SEED)).map(lambda n: SEED[:n]),
))
def test_decode_never_raises_anything_else(data):
    try:
        out = prepare(data, CFG)
    except BadImageError:
        return
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def _peak_growth_mb(code: str, data: bytes, tmp_path) -> float:
    """Peak memory a decode adds, measured in a fresh process (Pillow's buffers are not Python's)."""
    import subprocess
    import sys

    (tmp_path / "photo.bin").write_bytes(data)
    prog = ("import resource, sys; from extendserve.photos.preprocess import decode; "
            f"data = open({str(tmp_path / 'photo.bin')!r}, 'rb').read(); "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; " + code +
            "; print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.parametrize("mode", ["1", "P"])
def test_a_tiny_1_bit_or_palette_png_of_8000x8000_decodes_in_bounded_memory(mode, tmp_path):
    """Converted to RGBA at full size before the reduction, a 7.8 KB 1-bit PNG of 7999x7999 once
    cost about 550 MB; now a band at a time: the photo in its own mode (one byte a pixel) and a band."""
    import io

    im = Image.new(mode, (7999, 7999), 0)
    if mode == "P":
        im.putpalette([0, 0, 0, 255, 255, 255] * 128)
    im.paste(1, (0, 0, 7999, 4000))
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    assert len(buf.getvalue()) < 200_000
    grew = _peak_growth_mb("im = decode(data, 'x', 256); assert im.size[0] < 1000 and im.mode == 'RGB'", buf.getvalue(),
                           tmp_path)
    assert grew < 64 + 100, grew  # 64 MB for the decoded photo, then bands


def test_exif_orientation_is_kept_for_16_bit_and_float_photos():
    """A rotated 16-bit PNG was classified sideways: the wide-to-8-bit step made a new image without EXIF."""
    import io

    a = np.zeros((200, 300), np.uint16)
    a[:, :150] = 60000  # bright left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    ref = Image.fromarray((a // 257).astype(np.uint8), "L")
    got = {}
    for name, im in (("8-bit", ref), ("16-bit", Image.fromarray(a))):
        buf = io.BytesIO()
        im.save(buf, "PNG", exif=exif)
        got[name] = np.asarray(decode(buf.getvalue()))
    assert got["16-bit"].shape == got["8-bit"].shape == (300, 200, 3)
    assert np.abs(got["16-bit"].astype(int) - got["8-bit"]).max() <= 1


def test_a_float_tiff_with_one_inf_pixel_is_not_black():
    import io

    a = np.tile(np.linspace(0, 1000, 64, dtype=np.float32), (64, 1))
    clean = io.BytesIO()
    Image.fromarray(a, "F").save(clean, "TIFF")
    a[3, 3] = np.inf
    a[5, 5] = np.nan
    bad = io.BytesIO()
    Image.fromarray(a, "F").save(bad, "TIFF")
    want, got = np.asarray(decode(clean.getvalue())), np.asarray(decode(bad.getvalue()))
    assert got.mean() > 100 and np.abs(got.astype(int) - want).mean() < 1
