"""Class activation maps as a DICOM Parametric Map (`serving.parametric_map`), on real CT headers: the frames
lie on their source slices (same frame of reference, plane position and orientation, each frame referencing
its slice), the values are the maps' (resized to the slice), the object reads back with pydicom and passes
`dciodvfy`, including for de-identified sources without Type 2 attributes. The PACS loop storing it next to
the SR is tested in tests/test_real_series.py against a real Orthanc."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import shared_file

from cthub.errors import UnprocessableInputError
from serving.parametric_map import resize_map, write_parametric_maps
from serving.report import ModelIdentity, to_bytes

pytestmark = pytest.mark.shared
MODEL = ModelIdentity("tiny-chest", "v1", "cd" * 32, "fp32", "ct-ssl-hub 0.1.0")


def headers(folder: str, n: int) -> list[pydicom.Dataset]:
    files = sorted(shared_file("real_ct", folder).glob("*.dcm"))[:n]
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    path = tmp_path / "pm.dcm"
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def frames_of(pm: pydicom.Dataset) -> np.ndarray:
    """The float frames as stored (Float Pixel Data, little endian)."""
    n, r, c = int(pm.NumberOfFrames), int(pm.Rows), int(pm.Columns)
    return np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(n, r, c)


def test_maps_lie_on_their_slices_and_keep_their_values(tmp_path: Path) -> None:
    sources = headers("ge_head_tilt", 6)  # one frame of reference, gantry tilt, uneven gaps
    rng = np.random.default_rng(7)
    maps = [0.01 * rng.normal(size=(7, 7)).astype(np.float32) for _ in sources]  # a real CAM's range
    (pm,) = write_parametric_maps(sources, maps, "hemorrhage", MODEL)
    data = to_bytes(pm)
    back = pydicom.dcmread(io.BytesIO(data))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert back.Modality == "CT"
    assert back.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription and back.Manufacturer == "ct-ssl-hub"
    assert int(back.NumberOfFrames) == len(sources) and (back.Rows, back.Columns) == (512, 512)
    got = frames_of(back)
    by_uid = {src.SOPInstanceUID: k for k, src in enumerate(sources)}
    seen = []
    for f, frame in enumerate(back.PerFrameFunctionalGroupsSequence):  # highdicom may order frames spatially
        (ref,) = frame.DerivationImageSequence[0].SourceImageSequence
        k = by_uid[ref.ReferencedSOPInstanceUID]
        seen.append(k)
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[k].ImagePositionPatient], atol=1e-3)
        np.testing.assert_allclose(got[f], resize_map(maps[k], 512, 512), rtol=1e-6)
    assert sorted(seen) == list(range(len(sources)))
    shared = back.SharedFunctionalGroupsSequence[0]
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(orientation, [float(v) for v in sources[0].ImageOrientationPatient])
    window = shared.FrameVOILUTSequence[0]
    assert window.VOILUTFunction == "LINEAR_EXACT" and float(window.WindowWidth) == pytest.approx(got.max())
    rwvm = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(rwvm.RealWorldValueSlope) == 1.0 and float(rwvm.RealWorldValueIntercept) == 0.0
    assert dciodvfy_errors(data, tmp_path) == []


def test_slices_with_their_own_frames_of_reference_get_one_instance_each(tmp_path: Path) -> None:
    sources = headers("fnndsc_chest", 3)  # this published series gives every slice its own frame of reference
    assert len({s.FrameOfReferenceUID for s in sources}) == 3
    maps = [np.full((14, 14), float(i + 1), np.float32) for i in range(3)]
    pms = write_parametric_maps(sources, maps, "lung", MODEL)
    assert len(pms) == 3 and len({p.SeriesInstanceUID for p in pms}) == 1
    assert sorted(int(p.InstanceNumber) for p in pms) == [1, 2, 3]
    for pm, src, value in zip(pms, sources, (1.0, 2.0, 3.0), strict=True):
        back = pydicom.dcmread(io.BytesIO(to_bytes(pm)))
        assert back.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert np.all(frames_of(back) == value)
    assert dciodvfy_errors(to_bytes(pms[0]), tmp_path) == []


@pytest.mark.parametrize("how", ["absent", "empty"])
def test_deidentified_sources_give_a_valid_map(how: str, tmp_path: Path) -> None:
    sources = headers("ge_head_tilt", 2)  # PatientIdentityRemoved YES, empty DeidentificationMethod
    for ds in sources:
        for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
            if how == "absent":
                ds.pop(keyword, None)
            else:
                setattr(ds, keyword, None)
    (pm,) = write_parametric_maps(sources, [np.ones((7, 7), np.float32)] * 2, "normal", MODEL)
    assert dciodvfy_errors(to_bytes(pm), tmp_path) == []


def test_sources_without_geometry_are_refused_by_name() -> None:
    sources = headers("ge_head_tilt", 1)
    del sources[0].FrameOfReferenceUID
    with pytest.raises(UnprocessableInputError, match="FrameOfReferenceUID"):
        write_parametric_maps(sources, [np.ones((7, 7), np.float32)], "normal", MODEL)
    with pytest.raises(UnprocessableInputError):
        write_parametric_maps(headers("ge_head_tilt", 2), [np.ones((7, 7), np.float32)], "normal", MODEL)
