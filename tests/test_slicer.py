"""3D Slicer reads what ``register`` writes, through Slicer's own MRML libraries (``slicer-core``): the displacement
field without a warning (NIfTI intent 1006, vectors in RAS as the intent prescribes) mapping points exactly as
SimpleITK does, and the markups file with every point, label and position."""
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import slicer_core

from label_reg import io
from label_reg.register import Registrar


def _lps_ras(p):
    """LPS <-> RAS (its own inverse): x and y change sign."""
    return np.asarray(p, np.float64) * np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def registered(trained_model, phantom_dir, tmp_path_factory):
    """A held-out phantom registered by the trained model, with MR points that include one beyond the TRUS image."""
    root = tmp_path_factory.mktemp("slicer")
    name = "phantom012"
    files = {k: phantom_dir / f"{k}s" / f"{name}.nii.gz" for k in ("moving_image", "fixed_image", "moving_label")}
    mr = io.read_image(files["moving_image"])
    geo = io.Geometry.from_image(mr)
    points = geo.index_to_world(np.array([[20.0, 25.0, 30.0], [30.0, 30.0, 28.0], [24.0, 33.0, 20.0]]))
    points = np.vstack([points, [400.0, 0.0, 0.0]])
    csv = root / "points.csv"
    pd.DataFrame({"name": ["A", "B", "C", "far"], "x": points[:, 0], "y": points[:, 1],
                  "z": points[:, 2]}).to_csv(csv, index=False)
    return Registrar(trained_model[0]).register(files["moving_image"], files["fixed_image"], files["moving_label"],
                                                csv, root / "out")


def _read_with_slicer(storage, node, path):
    """(ReadData's result, the node, the storage node's user messages: [(type, text)])."""
    scene = slicer_core.vtkMRMLScene()
    scene.AddNode(node)
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    ok = storage.ReadData(node)
    messages = storage.GetUserMessages()
    return ok, node, [(messages.GetNthMessageType(i), messages.GetNthMessageText(i))
                      for i in range(messages.GetNumberOfMessages())]


def test_slicer_reads_the_field_without_a_warning_and_maps_points_as_simpleitk(registered):
    path = registered.files["transform_ddf"]
    ok, node, messages = _read_with_slicer(slicer_core.vtkMRMLTransformStorageNode(),
                                           slicer_core.vtkMRMLTransformNode(), path)
    assert ok == 1 and messages == []
    itk = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    geo = io.Geometry.from_image(sitk.ReadImage(str(path)))
    rng = np.random.default_rng(0)
    inside = geo.index_to_world(rng.uniform(1, np.asarray(geo.size) - 2, size=(25, 3)))  # TRUS points
    moved = []
    for p in inside:
        expected = np.array(itk.TransformPoint(tuple(map(float, p))))
        got = _lps_ras(node.GetTransformFromParent().TransformPoint(tuple(_lps_ras(p))))
        np.testing.assert_allclose(got, expected, atol=0.01)  # Slicer's grid transform is single precision
        moved.append(np.linalg.norm(expected - p))
    assert min(moved) > 1.0  # a real transform: every point moves (pre-alignment and network)


def test_slicer_reads_the_markups_with_their_points_and_labels(registered):
    ok, node, messages = _read_with_slicer(slicer_core.vtkMRMLMarkupsJsonStorageNode(),
                                           slicer_core.vtkMRMLMarkupsFiducialNode(),
                                           registered.files["moving_points_in_fixed_mrk"])
    assert ok == 1 and messages == []
    assert node.GetNumberOfControlPoints() == 4
    assert [node.GetNthControlPointLabel(i) for i in range(4)] == ["A", "B", "C", "far"]
    assert [node.GetNthControlPointDescription(i) for i in range(4)] == registered.point_status
    assert registered.point_status[:3] == ["ok"] * 3 and registered.point_status[3] == "outside_fixed_image"
    for i in range(4):
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, ras)
        np.testing.assert_allclose(_lps_ras(ras), registered.points_fixed[i], atol=1e-6)
