"""The phantom generator: anatomy in HU, findings, radiographs, files and manifest, determinism."""

import csv
import dataclasses

import numpy as np
import pytest
import torch

from mmv.data.phantom import (
    PHANTOM_FINDINGS,
    PhantomSettings,
    _standing_fluid,
    generate_phantom,
    phantom_manifest,
    radiograph,
    write_phantom_dataset,
)

COARSE = PhantomSettings(ct_spacing=(8.0, 8.0, 8.0), xray_spacing=4.0)


def test_generation_is_deterministic_per_seed_and_index():
    a = generate_phantom(3, seed=7, settings=COARSE)
    b = generate_phantom(3, seed=7, settings=COARSE)
    c = generate_phantom(4, seed=7, settings=COARSE)
    assert np.array_equal(a.hu, b.hu) and a.findings == b.findings
    assert not np.array_equal(a.hu, c.hu)
    assert set(a.findings) == set(PHANTOM_FINDINGS)


def test_anatomy_in_hounsfield_units():
    phantom = generate_phantom(0, settings=PhantomSettings(ct_spacing=(5.0, 5.0, 5.0)))
    hu = phantom.hu
    depth, height, width = hu.shape
    assert hu.shape == PhantomSettings(ct_spacing=(5.0, 5.0, 5.0)).ct_shape
    # Outside the body (the corners of an axial slice) is air.
    assert abs(float(np.median(hu[:, :3, :3])) + 1000) < 60
    middle = hu[depth // 2 + 4]
    lungs = middle[(middle > -950) & (middle < -700)]
    assert lungs.size > 0.1 * middle.size
    assert -900 < float(np.median(lungs)) < -780
    assert float(hu.max()) > 500  # bone


def test_findings_are_drawn_at_about_the_prevalence():
    counts = np.zeros(len(PHANTOM_FINDINGS))
    settings = PhantomSettings(ct_spacing=(16.0, 16.0, 16.0), prevalence=0.4)
    for index in range(40):
        findings = generate_phantom(index, seed=1, settings=settings).findings
        counts += [findings[name] for name in PHANTOM_FINDINGS]
    assert np.all(counts >= 6) and np.all(counts <= 28)


def test_radiograph_is_a_pa_view_with_the_head_up():
    phantom = generate_phantom(1, settings=COARSE)
    image, spacing = radiograph(phantom, spacing=4.0)
    assert spacing == (4.0, 4.0)
    fov_z, _, fov_x = COARSE.field_of_view_mm
    assert image.shape == (round(fov_z / 4.0), round(fov_x / 4.0))
    height, width = image.shape
    # Line integrals: nothing outside the body, the mediastinum and spine denser than the lungs, and
    # the abdomen (bottom rows) denser than the chest (top rows).
    assert float(image[:, :2].mean()) < 0.2
    upper = image[height // 4 : height // 2]
    assert float(upper[:, width // 2].mean()) > float(upper[:, width // 4].mean())
    assert float(image[-height // 6 :, width // 4].mean()) > float(upper[:, width // 4].mean())


def test_patients_differ_in_build_and_position():
    # Nuisance variation: body width and where the body lies in the field of view change between phantoms.
    widths, centres = [], []
    for index in range(6):
        body = generate_phantom(index, seed=3, settings=COARSE).hu > -500
        columns = np.flatnonzero(body.any(axis=(0, 1)))
        widths.append((columns[-1] - columns[0]) * COARSE.ct_spacing[2])
        centres.append(np.argwhere(body).mean(axis=0) * np.array(COARSE.ct_spacing))
    assert np.ptp(widths) > 30.0
    assert np.ptp(np.array(centres)[:, 2]) > 8.0 and np.ptp(np.array(centres)[:, 1]) > 8.0


def test_radiograph_acquisition_depends_on_the_seed_and_phantom_only():
    phantom = generate_phantom(2, settings=COARSE)
    first, _ = radiograph(phantom, spacing=4.0, seed=0)
    again, _ = radiograph(phantom, spacing=4.0, seed=0)
    other, _ = radiograph(phantom, spacing=4.0, seed=1)
    assert np.array_equal(first, again)
    # Another seed is another exposure, scatter, grey-level curve and positioning of the same patient.
    assert float(np.abs(first - other).mean()) > 0.05
    assert first.min() >= 0.0 and first.max() <= 8.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="index"):
        generate_phantom(-1)
    with pytest.raises(ValueError, match="prevalence"):
        PhantomSettings(prevalence=1.5)
    with pytest.raises(ValueError, match="count"):
        write_phantom_dataset("unused", count=0)
    with pytest.raises(ValueError, match="workers"):
        write_phantom_dataset("unused", count=2, workers=0)


def test_written_dataset_reads_back_with_its_labels(tmp_path):
    manifest = write_phantom_dataset(tmp_path, count=3, seed=2, settings=COARSE, progress=False)
    with open(manifest, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6
    assert {row["modality"] for row in rows} == {"CT", "DX"}
    dataset = phantom_manifest(manifest)
    assert dataset.label_names == PHANTOM_FINDINGS
    ct, xray = dataset[0], dataset[1]
    phantom = generate_phantom(0, seed=2, settings=COARSE)
    assert ct.image.is_3d and ct.image.spacing == COARSE.ct_spacing
    assert np.abs(ct.image.pixels.numpy() - np.round(phantom.hu)).max() <= 0.5
    assert not xray.image.is_3d and xray.image.spacing == (4.0, 4.0)
    expected = [float(phantom.findings[name]) for name in PHANTOM_FINDINGS]
    assert ct.labels.tolist() == expected and xray.labels.tolist() == expected
    assert rows[0]["group"] == rows[1]["group"] and rows[0]["split"] == rows[1]["split"]
    # The same request finds the data set in place and leaves it alone.
    before = manifest.stat().st_mtime_ns
    assert write_phantom_dataset(tmp_path, count=3, seed=2, settings=COARSE, progress=False) == manifest
    assert manifest.stat().st_mtime_ns == before


def test_parallel_workers_write_the_same_data_set(tmp_path):
    serial = write_phantom_dataset(tmp_path / "serial", count=5, seed=3, settings=COARSE, progress=False)
    parallel = write_phantom_dataset(tmp_path / "parallel", count=5, seed=3, settings=COARSE, progress=False, workers=2)
    assert serial.read_text() == parallel.read_text()
    one, other = phantom_manifest(serial), phantom_manifest(parallel)
    for index in range(len(one)):
        assert torch.equal(one[index].image.pixels, other[index].image.pixels)
        assert one[index].image.spacing == other[index].image.spacing


def test_standing_pleural_fluid_keeps_its_volume_and_settles_at_the_base_with_a_meniscus():
    z = torch.linspace(-100.0, 100.0, 41)[:, None, None]
    y = torch.linspace(-50.0, 50.0, 5)[None, :, None]
    x = torch.linspace(0.0, 100.0, 21)[None, None, :]
    lung = torch.ones(41, 5, 21, dtype=torch.bool)
    lying = lung & (y > 20.0) & (z < 0.0)  # posterior, in the lower half: a patient on their back
    standing = _standing_fluid(lung, lying, z, x, centre=(0.0, 0.0, 50.0), semi=(100.0, 50.0, 50.0), side=1.0)
    assert lying.sum() <= standing.sum() <= lying.sum() + 5 * 21
    # Standing, the fluid fills whole depths at the base instead of the back ...
    assert float(z.expand_as(lung)[standing].mean()) < float(z.expand_as(lung)[lying].mean())
    assert bool(standing[:, 0].eq(standing[:, -1]).all())
    # ... and climbs higher at the lateral wall (x = 100 for the left lung) than in the middle.
    top = [float(z.flatten()[standing[:, 0, column]].max()) for column in (10, 20)]
    assert top[1] > top[0]
    right = _standing_fluid(lung, lying, z, x, centre=(0.0, 0.0, 50.0), semi=(100.0, 50.0, 50.0), side=-1.0)
    assert float(z.flatten()[right[:, 0, 0]].max()) > float(z.flatten()[right[:, 0, 10]].max())


def test_the_radiograph_shows_the_patient_standing():
    phantom = next(p for p in (generate_phantom(i, settings=COARSE) for i in range(20)) if p.findings["Pleural effusion"])
    assert phantom.erect_hu is not None and phantom.erect_hu.shape == phantom.hu.shape
    # The same chest: apart from where the fluid lies and the CT's noise, the two volumes agree.
    assert float(np.median(np.abs(phantom.erect_hu - phantom.hu))) < 40.0
    standing, _ = radiograph(phantom, spacing=4.0)
    lying, _ = radiograph(dataclasses.replace(phantom, erect_hu=None), spacing=4.0)
    assert not np.array_equal(standing, lying)
