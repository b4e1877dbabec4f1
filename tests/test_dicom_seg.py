"""DICOM-SEG output: a generated CT series, a SEG written for a known mask, read back with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from medunet.errors import InputError  # noqa: E402
from medunet.inference import Predictor  # noqa: E402
from medunet.inference.predictor import find_inputs  # noqa: E402
from medunet.io import read_image  # noqa: E402
from medunet.io.dicom import dicom_series_files, read_dicom_series  # noqa: E402
from medunet.io.dicom_seg import write_dicom_seg  # noqa: E402
from medunet.planning import Plan  # noqa: E402


def write_ct_series(folder: Path, vol_zyx: np.ndarray, series_uid: str | None = None,
                    spacing=(0.8, 0.7, 2.5), origin=(-10.0, 5.0, 30.0)) -> list[Path]:
    """Single-frame CT files (MONOCHROME2, int16), one per slice, named in reverse position
    order so that readers must sort by ImagePositionPatient. Returns the files by position."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_ref = generate_uid(), series_uid or generate_uid(), generate_uid()
    n, rows, cols = vol_zyx.shape
    files = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Phantom", "P001"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_ref
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(vol_zyx[k], dtype=np.int16).tobytes()
        path = folder / f"im{n - 1 - k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def read_seg_frames(path: Path, n_slices: int, source_files: list[Path]) -> tuple:
    """Decode a SEG into ``(segments, slices, rows, cols)`` through each frame's references
    (source SOP instance and segment number), independent of the writer's frame order; also
    the ``(segment, slice)`` of each frame in file order."""
    seg = pydicom.dcmread(str(path))
    uid_to_slice = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: k
                    for k, f in enumerate(source_files)}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    out = np.zeros((len(seg.SegmentSequence), n_slices, seg.Rows, seg.Columns), np.uint8)
    order = []
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ident = item if "SegmentIdentificationSequence" in item else seg.SharedFunctionalGroupsSequence[0]
        number = ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        out[number - 1, uid_to_slice[src]] = frames[i]
        order.append((number, uid_to_slice[src]))
    return seg, out, order


def test_write_dicom_seg_round_trip(tmp_path):
    vol = np.full((6, 16, 16), -1000, np.int16)
    files = write_ct_series(tmp_path / "ct", vol)
    assert dicom_series_files(tmp_path / "ct", pydicom.dcmread(str(files[0])).SeriesInstanceUID) == files
    labels = np.zeros((6, 16, 16), np.uint8)  # (slices, rows, columns), raw label values 0/3/7
    labels[1:4, 2:9, 3:12] = 3
    labels[2, 10:14, 10:15] = 7
    out = write_dicom_seg(labels, files, tmp_path / "out" / "case.seg.dcm", [0, 3, 7],
                          ["background", "liver", "tumour"], layout="zyx")
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    seg, decoded, order = read_seg_frames(out, 6, files)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    # non-empty frames only: liver on slices 1-3, tumour on slice 2
    assert int(seg.NumberOfFrames) == 3 + 1
    source_uid = pydicom.dcmread(str(files[0])).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 6
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour"]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "medunet" and algo.AlgorithmVersion
    np.testing.assert_array_equal(decoded[0], labels == 3)
    np.testing.assert_array_equal(decoded[1], labels == 7)
    # highdicom orders the frames spatially (along the slice normal, one direction), segment by
    # segment: monotonic in the source slice order, each frame naming its source slice
    liver = [k for n, k in order if n == 1]
    assert liver in ([1, 2, 3], [3, 2, 1]) and [n for n, _ in order] == [1, 1, 1, 2]
    # (X, Y, Z) as medunet.io reads the series gives the same file content
    out2 = write_dicom_seg(np.transpose(labels, (2, 1, 0)), files, tmp_path / "xyz.seg.dcm", [0, 3, 7],
                           ["background", "liver", "tumour"])
    np.testing.assert_array_equal(read_seg_frames(out2, 6, files)[1], decoded)


def test_write_dicom_seg_errors(tmp_path):
    files = write_ct_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16))
    with pytest.raises(InputError, match="does not fit the series"):
        write_dicom_seg(np.zeros((3, 8, 9), np.uint8), files, tmp_path / "a.seg.dcm", [0, 1], ["bg", "fg"],
                        layout="zyx")
    assert not (tmp_path / "a.seg.dcm").exists()
    # nothing predicted: every (slice, segment) frame is kept, empty
    seg, decoded, _ = read_seg_frames(
        write_dicom_seg(np.zeros((3, 8, 8), np.uint8), files, tmp_path / "b.seg.dcm", [0, 1], ["bg", "fg"],
                        layout="zyx"), 3, files)
    assert int(seg.NumberOfFrames) == 3 and decoded.max() == 0


class _SignNet(torch.nn.Module):
    """Logits ``[-x, x]``: class 1 where the raw intensity is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x, x], dim=1)


def test_predict_dicom_folder_writes_nifti_and_seg(tmp_path):
    vol = np.full((6, 16, 16), -1000, np.int16)
    vol[2:5, 4:10, 3:13] = 200  # the object: rows 4-9, columns 3-12, slices 2-4
    box = (vol > 0).astype(np.uint8)
    files_a = write_ct_series(tmp_path / "dicom" / "patientA", vol)
    write_ct_series(tmp_path / "dicom" / "patientB", np.full((4, 16, 16), -1000, np.int16))
    cases = find_inputs(tmp_path / "dicom", 1)
    assert [(c.case_id, c.series_uid is not None) for c in cases] == [("patientA", True), ("patientB", True)]
    plan = Plan(dataset_name="t", dim=3, in_channels=1, channel_names=["CT"], label_names=["bg", "organ"],
                label_values=[0, 1], spacing=[0.8, 0.7, 2.5], median_shape=[16, 16, 6],
                normalization=[{"scheme": "none"}], patch_size=[16, 16, 8], batch_size=2,
                network={"preset": "default"}, inference={"overlap": 0.5})
    out = tmp_path / "out"
    written = Predictor(plan, [_SignNet()]).predict(tmp_path / "dicom", out, progress=False)
    assert [p.name for p in written] == ["patientA.nii.gz", "patientB.nii.gz"]
    assert (out / "patientA.seg.dcm").is_file() and (out / "patientB.seg.dcm").is_file()
    labels, geom = read_image(out / "patientA.nii.gz")
    np.testing.assert_array_equal(labels[0], np.transpose(box, (2, 1, 0)))  # (X, Y, Z)
    _, src_geom = read_dicom_series(tmp_path / "dicom" / "patientA")
    np.testing.assert_allclose(geom.spacing, src_geom.spacing, atol=1e-5)
    seg, decoded, _ = read_seg_frames(out / "patientA.seg.dcm", 6, files_a)
    np.testing.assert_array_equal(decoded[0], box)
    assert int(seg.NumberOfFrames) == 3 and [s.SegmentLabel for s in seg.SegmentSequence] == ["organ"]
    Predictor(plan, [_SignNet()]).predict(tmp_path / "dicom" / "patientB", tmp_path / "o2", progress=False,
                                          dicom_seg=False)
    assert (tmp_path / "o2" / "patientB.nii.gz").is_file()
    assert not (tmp_path / "o2" / "patientB.seg.dcm").exists()
