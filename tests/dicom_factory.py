"""Writes DICOM test files with known PHI planted in many places.

Every planted value contains a unique token (``PHI`` + two letters + digits), so a test
can search any bytes the system produced for every token. Pixels come from a real
reference radiograph, rescaled to the requested size and stored as 16-bit MONOCHROME2.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


def tokens(n: int) -> dict[str, str]:
    """Planted values by place. Each holds its own unique token."""
    t = f"{n:04d}"
    return {
        "PatientName": f"PHINAme{t}^Jörg^Müller",
        "PatientID": f"PHIpid{t}",
        "OtherPatientIDs": f"PHIopid{t}",
        "PatientBirthDate": "19410512",
        "PatientAddress": f"PHIaddr{t} Rue de la Paix",
        "PatientTelephoneNumbers": f"PHItel{t}",
        "ReferringPhysicianName": f"PHIrefdoc{t}^Anna",
        "PerformingPhysicianName": f"PHIperf{t}^Bo",
        "OperatorsName": f"PHIoper{t}",
        "InstitutionName": f"PHIinst{t} Hospital",
        "InstitutionAddress": f"PHIinstaddr{t}",
        "StationName": f"PHIstat{t}",
        "AccessionNumber": f"PHIacc{t}",
        "StudyID": f"PHIsid{t}",
        "StudyDescription": f"PHIstudydesc{t}",
        "SeriesDescription": f"PHIserdesc{t}",
        "ImageComments": f"PHIcomment{t}",
        "RequestingPhysician": f"PHIreqdoc{t}",
        "AdditionalPatientHistory": f"PHIhistory{t}",
        "OtherPatientIDsSequence": f"PHIopidseq{t}",
        "NestedLevel3": f"PHInest{t}",
        "PrivateElement": f"PHIpriv{t}",
        "PrivateSequence": f"PHIprivseq{t}",
        "OverlayDescription": f"PHIoverlay{t}",
        "SRText": f"PHIsrtext{t}",
        "DeviceSerialNumber": f"PHIserial{t}",
        "PatientMotherBirthName": f"PHImother{t}",
        "JapaneseName": f"PHIjp{t}^山田^太郎",
    }


def planted_strings(n: int) -> list[str]:
    """What must never be found again (the unique token of every planted value)."""
    return [v.split("^")[0].split(" ")[0] for k, v in tokens(n).items() if "PHI" in v]


def load_pixels(png: Path, size: int) -> np.ndarray:
    img = Image.open(png).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(img, dtype=np.uint16) * 16).astype(np.uint16)  # 12 bits stored


def make_dicom(
    path: Path,
    n: int,
    pixels: np.ndarray,
    *,
    patient: int | None = None,
    modality: str = "CR",
    burned_in: str | None = None,
    charset: str = "ISO_IR 192",
) -> str:
    """Write one planted file; returns its SOPInstanceUID."""
    tk = tokens(n if patient is None else patient)
    own = tokens(n)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = tk["PatientName"]
    ds.PatientID = tk["PatientID"]
    ds.PatientBirthDate = tk["PatientBirthDate"]
    ds.PatientSex = "F"
    ds.PatientAge = "062Y"
    ds.PatientAddress = tk["PatientAddress"]
    ds.PatientTelephoneNumbers = tk["PatientTelephoneNumbers"]
    ds.PatientMotherBirthName = tk["PatientMotherBirthName"]
    ds.OtherPatientIDs = tk["OtherPatientIDs"]
    ds.AdditionalPatientHistory = own["AdditionalPatientHistory"]
    ds.StudyDate = dt.date(2024, 3, 5).strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = own["ReferringPhysicianName"]
    ds.PerformingPhysicianName = own["PerformingPhysicianName"]
    ds.OperatorsName = own["OperatorsName"]
    ds.InstitutionName = own["InstitutionName"]
    ds.InstitutionAddress = own["InstitutionAddress"]
    ds.StationName = own["StationName"][:16]
    ds.AccessionNumber = own["AccessionNumber"][:16]
    ds.StudyID = own["StudyID"][:16]
    ds.StudyDescription = own["StudyDescription"]
    ds.SeriesDescription = own["SeriesDescription"]
    ds.ImageComments = own["ImageComments"]
    ds.DeviceSerialNumber = own["DeviceSerialNumber"]
    ds.ViewPosition = "PA"
    if burned_in:
        ds.BurnedInAnnotation = burned_in
    if charset == "ISO_IR 192":
        ds.PatientBirthName = own["JapaneseName"]

    opid = Dataset()
    opid.PatientID = own["OtherPatientIDsSequence"]
    opid.IssuerOfPatientID = f"{own['OtherPatientIDsSequence']}-issuer"
    ds.OtherPatientIDsSequence = Sequence([opid])

    # Three levels deep: RequestAttributesSequence > ... > a person name.
    level3 = Dataset()
    level3.PersonName = own["NestedLevel3"]
    level3.CodeMeaning = own["NestedLevel3"]
    level2 = Dataset()
    level2.ConceptNameCodeSequence = Sequence([level3])
    level2.RequestingPhysician = own["RequestingPhysician"]
    level1 = Dataset()
    level1.RequestedProcedureDescription = own["NestedLevel3"]
    level1.ReferencedStudySequence = Sequence([level2])
    ds.RequestAttributesSequence = Sequence([level1])

    # Structured-report style free text.
    sr = Dataset()
    sr.ValueType = "TEXT"
    sr.TextValue = own["SRText"]
    ds.ContentSequence = Sequence([sr])

    # Private elements and a private sequence.
    block = ds.private_block(0x0011, "SYNTHRAY TEST", create=True)
    block.add_new(0x01, "LO", own["PrivateElement"])
    inner = Dataset()
    inner.add_new(0x00100010, "PN", own["PrivateSequence"])
    block.add_new(0x02, "SQ", Sequence([inner]))

    # An overlay with a description.
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000022, "LO", own["OverlayDescription"])
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)

    rows, cols = pixels.shape
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)
