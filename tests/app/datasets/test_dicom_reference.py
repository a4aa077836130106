"""Every real DICOM file of the reference set: decoded to the expected picture, or
rejected with the expected reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import SHARED_DATA

from synthray.app.datasets.decode import DecodeOptions, Rejected, decode_path

# (file, mean, std of the 64 px image, view, sex, age band) or (file, rejection reason)
EXPECTED: list[tuple] = [
    ("966.dcm", "DICOM pixel data cannot be decoded"),  # broken JPEG 2000 codestream
    ("966_fixed.dcm", 149.6, 58.8, "PA", None, None),  # MONOCHROME1 + INVERSE, 12 bit
    ("CR-MONO1-10-chest.dcm", 139.5, 39.9, "PA", None, None),  # ACR-NEMA, no file meta
    ("JPEG2KLossless_1s_1f_u_16_16.dcm", 83.3, 62.3, None, "F", "40-49"),
    ("RG1_J2KI.dcm", 180.1, 59.5, "PA", "F", "60-69"),
    ("RG1_J2KR.dcm", 180.1, 59.5, "PA", "F", "60-69"),
    ("RG1_JLSN.dcm", 180.1, 59.5, "PA", "F", "60-69"),
    ("RG1_UNCI.dcm", 180.1, 59.5, "PA", "F", "60-69"),
    ("chrJapMulti.dcm", "DICOM file has no pixel data"),
    ("chrJapMultiExplicitIR6.dcm", "DICOM file has no pixel data"),
    ("chrKoreanMulti.dcm", "DICOM file has no pixel data"),
    (
        "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
        169.0,
        59.1,
        "PA",
        "M",
        "60-69",
    ),
    ("siim_Fake_MONOHR1.dcm", 85.9, 59.1, "PA", "M", "60-69"),  # same pixels, MONOCHROME1
    ("vet_cat_DX_thorax.dcm", 73.0, 77.6, "AP", "M", "0-9"),
]
OPTS = DecodeOptions(sizes=(64, 128), secret="s" * 32)


def _path(name: str) -> Path:
    p = SHARED_DATA / "dicom" / name
    if not p.is_file():
        pytest.fail(f"reference DICOM missing: {p}")
    return p


@pytest.mark.parametrize("case", EXPECTED, ids=[c[0][:30] for c in EXPECTED])
def test_reference_file(case: tuple) -> None:
    name = case[0]
    if isinstance(case[1], str):
        with pytest.raises(Rejected) as exc:
            decode_path(_path(name), OPTS, 1 << 30)
        assert str(exc.value) == case[1]
        return
    _, mean, std, view, sex, band = case
    d = decode_path(_path(name), OPTS, 1 << 30)
    img = d.pixels[64]
    assert img.shape == (64, 64) and img.dtype == np.uint8
    assert d.pixels[128].shape == (128, 128)
    assert img.mean() == pytest.approx(mean, abs=1.0)
    assert img.std() == pytest.approx(std, abs=1.0)
    assert (d.view, d.sex, d.age_band) == (view, sex, band)
    assert d.patient_key is None or len(d.patient_key) == 32


def test_the_four_encodings_of_one_image_agree() -> None:
    """Uncompressed, JPEG 2000 lossless and JPEG-LS lossless give the same pixels; lossy
    JPEG 2000 stays within a few grey levels."""
    imgs = {
        n: decode_path(_path(f"RG1_{n}.dcm"), OPTS, 1 << 30).pixels[128]
        for n in ("UNCI", "J2KR", "JLSN", "J2KI")
    }
    ref = imgs["UNCI"].astype(int)
    for n in ("J2KR", "JLSN"):
        assert np.abs(imgs[n].astype(int) - ref).max() <= 1
    assert np.abs(imgs["J2KI"].astype(int) - ref).mean() < 2.0


def test_monochrome1_is_shown_inverted() -> None:
    """The same pixels labelled MONOCHROME1 come out as the negative of MONOCHROME2."""
    a = decode_path(_path(EXPECTED[11][0]), OPTS, 1 << 30).pixels[64].astype(int)
    b = decode_path(_path("siim_Fake_MONOHR1.dcm"), OPTS, 1 << 30).pixels[64].astype(int)
    inside = np.s_[4:60, 4:60]  # away from the padding
    assert np.abs((255 - a[inside]) - b[inside]).mean() < 2.0


def test_inverse_presentation_lut_lungs_are_dark() -> None:
    """966_fixed is MONOCHROME1 with an INVERSE presentation LUT: lungs (upper middle
    thirds of each side) must come out darker than the mediastinum."""
    img = decode_path(_path("966_fixed.dcm"), OPTS, 1 << 30).pixels[64].astype(float)
    lungs = (img[16:36, 12:24].mean() + img[16:36, 40:52].mean()) / 2
    spine = img[16:36, 29:35].mean()
    assert lungs < spine
