"""Synthetic chest phantoms with known findings: CT volumes in HU and radiographs of the same phantoms.

Every phantom is a chest built from simple solids with sizes in millimetres: body wall with a fat layer,
two lungs with a domed diaphragm and parenchymal texture, heart, mediastinum, aorta, trachea and main
bronchi, spine, ribs and sternum. Five findings are drawn independently per phantom, always inside the
lungs (never in what the heart and the aorta cover):

``Lung nodule``
    one to three solid spheres of 8-30 mm diameter.
``Pleural effusion``
    fluid in one or both pleural spaces, where gravity takes it: the CT is taken lying down, so the fluid
    fills the posterior, basal part of the lung; the radiograph is taken standing, so the same amount of
    fluid fills the base and climbs the lateral chest wall (the meniscus), blunting the costophrenic angle.
``Cardiomegaly``
    a heart 30-50 % wider than normal (cardiothoracic ratio well above one half).
``Consolidation``
    airspace disease filling part (60-110 mm) of one lobe, the upper or the lower, with air bronchograms.
``Emphysema``
    low-density parenchyma with bullae, hyperinflated lungs and flattened diaphragms.

Patients and scans vary as they do in practice, independently of the findings: body size and build,
position in the field of view, depth of inspiration, intravenous contrast or none and the CT noise level;
for radiographs also a slight rotation, the magnification, the exposure, scattered radiation and the
detector's grey-level curve. A reader of the images has to see the findings through that variation.

The radiograph of a phantom is a digitally reconstructed radiograph (DRR): the line integral of the
linear attenuation through the standing patient's volume (:attr:`Phantom.erect_hu`) along the
anterior-posterior axis, shown as in a PA film (patient
left on the image's right, head at the top, dense tissue bright), with quantum noise.

Volumes are held in the canonical LPS orientation of :mod:`mmv.data.io` (x toward the patient's left, y
toward posterior, z toward superior; arrays ``[z, y, x]``) and written as NIfTI (``.nii.gz``, int16 HU);
radiographs as 16-bit PNG with their pixel spacing. :func:`write_phantom_dataset` writes a data set with a
manifest CSV that :func:`phantom_manifest` (or :class:`mmv.data.Manifest`) reads. Everything depends only on
the seed and the phantom's number, so a data set is the same on every machine and its first N phantoms are
the same whatever N.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmv.data.dataset_spec import DatasetSpec, open_dataset
from mmv.data.datasets import CT_MODALITY, XRAY_MODALITY

__all__ = [
    "PHANTOM_FINDINGS",
    "PhantomSettings",
    "Phantom",
    "generate_phantom",
    "radiograph",
    "write_phantom_dataset",
    "phantom_manifest",
    "MANIFEST_NAME",
]

PHANTOM_FINDINGS = ("Lung nodule", "Pleural effusion", "Cardiomegaly", "Consolidation", "Emphysema")
MANIFEST_NAME = "manifest.csv"
DESCRIPTION_NAME = "phantoms.json"

# Linear attenuation of water for a diagnostic beam (about 70 keV effective), per mm.
_WATER_ATTENUATION_PER_MM = 0.019
# Line integrals are stored as PNG grey levels on this fixed scale, so that grey levels mean the same
# attenuation in every radiograph of a data set.
_MAX_LINE_INTEGRAL = 8.0
# Detected photons per pixel behind water-free air at a typical exposure; sets the quantum noise of the
# radiographs (each radiograph's exposure varies around it).
_PHOTONS_PER_PIXEL = 2.0e4
# Width of the scattered radiation's spread over the detector.
_SCATTER_SIGMA_MM = 40.0


@dataclass(frozen=True)
class PhantomSettings:
    """Geometry and finding prevalence of generated phantoms.

    Attributes:
        ct_spacing: voxel size of the CT volumes in mm, (z, y, x).
        field_of_view_mm: physical extent of the volumes in mm, (z, y, x).
        xray_spacing: pixel size of the radiographs in mm.
        prevalence: probability of each finding, drawn independently per phantom.
        split_fractions: shares of phantoms in the train, val and test splits.
    """

    ct_spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)
    field_of_view_mm: tuple[float, float, float] = (320.0, 360.0, 360.0)
    xray_spacing: float = 2.0
    prevalence: float = 0.4
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def __post_init__(self) -> None:
        for name in ("ct_spacing", "field_of_view_mm"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"PhantomSettings: {name} must be three positive numbers (z, y, x) in mm, got {values}")
            object.__setattr__(self, name, values)
        if not (math.isfinite(self.xray_spacing) and self.xray_spacing > 0):
            raise ValueError(f"PhantomSettings: xray_spacing must be a positive number of mm, got {self.xray_spacing}")
        if not 0.0 < self.prevalence < 1.0:
            raise ValueError(f"PhantomSettings: prevalence must lie in (0, 1), got {self.prevalence}")
        fractions = tuple(float(f) for f in self.split_fractions)
        if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
            raise ValueError(
                f"PhantomSettings: split_fractions must be three non-negative shares (train, val, test) summing to 1, "
                f"got {self.split_fractions}"
            )
        object.__setattr__(self, "split_fractions", fractions)

    @property
    def ct_shape(self) -> tuple[int, int, int]:
        """Voxels per axis of the CT volumes, (z, y, x)."""
        return tuple(max(8, round(extent / step)) for extent, step in zip(self.field_of_view_mm, self.ct_spacing))


@dataclass
class Phantom:
    """One generated chest phantom.

    Attributes:
        hu: float32 ``[z, y, x]`` CT numbers in HU (LPS orientation, z toward superior), as the CT scans
            the patient: lying down, with the scanner's noise.
        spacing: voxel size in mm, (z, y, x).
        findings: finding name -> present, for every name of :data:`PHANTOM_FINDINGS`.
        index: the phantom's number in its data set.
        erect_hu: the same patient standing, as a PA radiograph is taken (pleural fluid at the lung bases),
            without the CT's noise; None means as ``hu``.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    findings: dict[str, bool] = field(default_factory=dict)
    index: int = 0
    erect_hu: np.ndarray | None = None


class _Grid:
    """Voxel-centre coordinates in mm from ``origin`` (given from the volume centre), broadcastable over
    ``[z, y, x]``.

    Solids are evaluated only inside their bounding box: a :class:`_Region` is that box (slices) and the
    solid's mask within it.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.shape = shape
        self.spacing = spacing
        self.axes = [
            (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * s - o for n, s, o in zip(shape, spacing, origin)
        ]
        self.z = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.x = self.axes[2][None, None, :]

    def box(self, low, high) -> tuple[slice, slice, slice]:
        """Slices of the voxels whose centres lie between ``low`` and ``high`` mm, (z, y, x)."""
        slices = []
        for axis, lo, hi in zip(self.axes, low, high):
            start = int(torch.searchsorted(axis, torch.tensor(float(lo))))
            stop = int(torch.searchsorted(axis, torch.tensor(float(hi)), right=True))
            slices.append(slice(start, max(start, stop)))
        return tuple(slices)

    def local(self, slices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.z[slices[0]], self.y[:, slices[1]], self.x[:, :, slices[2]]

    def ellipsoid(self, centre, semi_axes) -> _Region:
        """An axis-aligned ellipsoid; centre and semi-axes in mm, (z, y, x)."""
        slices = self.box([c - a for c, a in zip(centre, semi_axes)], [c + a for c, a in zip(centre, semi_axes)])
        z, y, x = self.local(slices)
        (cz, cy, cx), (az, ay, ax) = centre, semi_axes
        return _Region(slices, ((z - cz) / az) ** 2 + ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1.0)

    def cylinder_z(self, centre_yx, radii_yx, z_range=(-math.inf, math.inf)) -> _Region:
        """An elliptic cylinder along z between two heights."""
        (cy, cx), (ry, rx) = centre_yx, radii_yx
        low = (max(z_range[0], -1e6), cy - ry, cx - rx)
        high = (min(z_range[1], 1e6), cy + ry, cx + rx)
        slices = self.box(low, high)
        z, y, x = self.local(slices)
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
        return _Region(slices, inside.expand(z.shape[0], -1, -1))

    def capsule(self, start, end, radius: float) -> _Region:
        """The points within ``radius`` mm of the segment from ``start`` to ``end`` (z, y, x)."""
        low = [min(a, b) - radius for a, b in zip(start, end)]
        high = [max(a, b) + radius for a, b in zip(start, end)]
        slices = self.box(low, high)
        z, y, x = self.local(slices)
        direction = [b - a for a, b in zip(start, end)]
        length_sq = sum(d * d for d in direction)
        dz, dy, dx = z - start[0], y - start[1], x - start[2]
        t = ((dz * direction[0] + dy * direction[1] + dx * direction[2]) / length_sq).clamp(0.0, 1.0)
        distance_sq = (dz - t * direction[0]) ** 2 + (dy - t * direction[1]) ** 2 + (dx - t * direction[2]) ** 2
        return _Region(slices, distance_sq <= radius**2)


@dataclass
class _Region:
    """A solid: its bounding box in the volume and its mask inside that box."""

    slices: tuple[slice, slice, slice]
    mask: torch.Tensor

    def paint(self, volume: torch.Tensor, value, within: torch.Tensor | None = None) -> None:
        """Set ``volume`` to ``value`` (a number or a whole-volume tensor) on the region (and ``within``)."""
        mask = self.mask if within is None else self.mask & within[self.slices]
        target = volume[self.slices]
        if isinstance(value, torch.Tensor):
            target[mask] = value[self.slices][mask]
        else:
            target[mask] = value

    def dense(self, shape) -> torch.Tensor:
        """The region as a whole-volume bool mask."""
        out = torch.zeros(shape, dtype=torch.bool)
        out[self.slices] = self.mask
        return out


def _smooth_noise(shape, spacing, correlation_mm: float, generator: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-variance noise with structures of about ``correlation_mm`` (coarse noise, upsampled)."""
    coarse = [max(2, math.ceil(n * s / correlation_mm) + 1) for n, s in zip(shape, spacing)]
    noise = torch.randn(1, 1, *coarse, generator=generator)
    field = F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    return (field - field.mean()) / field.std().clamp_min(1e-6)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _random_point_in(mask: torch.Tensor, grid: _Grid, rng: np.random.Generator, region: _Region) -> tuple[float, float, float]:
    """The mm position of a random voxel of ``mask`` inside ``region``'s box (which must hold one)."""
    box = mask[region.slices]
    for _ in range(1000):
        index = [int(rng.integers(max(1, n))) for n in box.shape]
        if bool(box[tuple(index)]):
            break
    else:
        index = torch.nonzero(box)[0].tolist()
    return tuple(float(axis[sl][i]) for axis, sl, i in zip(grid.axes, region.slices, index))


def generate_phantom(index: int, seed: int = 0, settings: PhantomSettings | None = None) -> Phantom:
    """Generate phantom number ``index`` of the data set drawn with ``seed``.

    Besides the findings, every phantom draws its own patient and scan, independently of its labels:
    body size and build, position in the field of view, depth of inspiration, intravenous contrast or
    none, and the CT noise level. The result depends only on ``(seed, index, settings)``.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"generate_phantom: index must be a non-negative int, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"generate_phantom: seed must be a non-negative int, got {seed!r}")
    settings = settings or PhantomSettings()
    rng = np.random.default_rng([seed, index])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    findings = {name: bool(rng.random() < settings.prevalence) for name in PHANTOM_FINDINGS}
    # The patient lies off the centre of the field of view (table height, lateral centring, scan range);
    # the anatomy below is laid out around the body's axis.
    position = (_uniform(rng, -25, 25), _uniform(rng, -15, 15), _uniform(rng, -15, 15))
    grid = _Grid(settings.ct_shape, settings.ct_spacing, position)
    shape = grid.shape
    hu = torch.full(shape, -1000.0)

    # Body wall: soft tissue inside a layer of subcutaneous fat; build from slim to large.
    build = _uniform(rng, 0.85, 1.15)
    body_x, body_y = 155.0 * build * _uniform(rng, 0.93, 1.07), 107.0 * build * _uniform(rng, 0.9, 1.1)
    body_region = grid.cylinder_z((0.0, 0.0), (body_y, body_x))
    body = body_region.dense(shape)
    fat = _uniform(rng, 0.05, 0.18)
    body_region.paint(hu, -100.0 + 10.0 * _uniform(rng, -1, 1))
    grid.cylinder_z((0.0, 0.0), (body_y * (1 - fat), body_x * (1 - fat))).paint(hu, 40.0)

    # Lungs, with diaphragm domes pushed up from below. A deeper breath makes them taller and darker;
    # emphysema hyperinflates them and flattens the domes.
    emphysema = findings["Emphysema"]
    inspiration = _uniform(rng, 0.88, 1.1)
    lung_z0 = _uniform(rng, -10, 10)
    lungs, lung_parts = torch.zeros(shape, dtype=torch.bool), []
    for side in (-1.0, 1.0):  # -1: patient's right (x negative), +1: left
        centre = (lung_z0 + _uniform(rng, -8, 8), _uniform(rng, 0, 12), side * body_x * _uniform(rng, 0.44, 0.5))
        semi = (
            _uniform(rng, 105, 125) * inspiration * (1.12 if emphysema else 1.0),
            body_y * _uniform(rng, 0.68, 0.78),
            body_x * _uniform(rng, 0.32, 0.37) * (0.92 if side > 0 else 1.0),
        )
        # The dome rises from the costophrenic angles; the right one higher, over the liver.
        dome_height = semi[0] * (0.1 if emphysema else _uniform(rng, 0.25, 0.35)) * (1.15 if side < 0 else 1.0)
        dome_semi = (semi[0] * 0.6, semi[1] * 1.3, semi[2] * 1.4)
        dome_centre = (centre[0] - 0.85 * semi[0] + dome_height - dome_semi[0], centre[1], centre[2])
        region = grid.ellipsoid(centre, semi)
        dome = grid.ellipsoid(dome_centre, dome_semi).dense(shape)
        region.mask = region.mask & ~dome[region.slices] & body[region.slices]
        lung = region.dense(shape)
        lungs |= lung
        lung_parts.append((lung, region, centre, semi))
    parenchyma = -850.0 - 250.0 * (inspiration - 1.0) + 25.0 * _smooth_noise(shape, grid.spacing, 12.0, generator)
    if emphysema:
        parenchyma = parenchyma - _uniform(rng, 50, 80)
    hu = torch.where(lungs, parenchyma, hu)
    # Vessels: bright streaks where a smooth random field peaks.
    vessel_field = _smooth_noise(shape, grid.spacing, 8.0, generator)
    hu[lungs & (vessel_field > 1.6)] = -200.0 + 100.0 * _uniform(rng, -1, 1)
    if emphysema:
        for _ in range(int(rng.integers(15, 35))):
            lung, region, centre, semi = lung_parts[int(rng.integers(2))]
            upper = region.dense(shape) & (grid.z > centre[0] - 0.2 * semi[0])
            radius = _uniform(rng, 4, 12)
            grid.ellipsoid(_random_point_in(upper, grid, rng, region), (radius,) * 3).paint(hu, -985.0, lungs)

    # Blood is bright in a scan with intravenous contrast (about half of chest CTs), like muscle without.
    blood = _uniform(rng, 150, 300) if rng.random() < 0.5 else _uniform(rng, 35, 50)

    # Mediastinum, aorta and airways between the lungs.
    grid.cylinder_z((-15.0, 0.0), (45.0, 28.0), (lung_z0 - 40.0, lung_z0 + 120.0)).paint(hu, 30.0, ~lungs)
    aorta_x, aorta_y = _uniform(rng, 15, 25), body_y * 0.45
    aorta = grid.cylinder_z((aorta_y, aorta_x), (12.0, 12.0), (-math.inf, lung_z0 + 60.0))
    aorta.paint(hu, blood)
    arch = grid.capsule((lung_z0 + 60.0, aorta_y, aorta_x), (lung_z0 + 75.0, -25.0, 5.0), 13.0)
    arch.paint(hu, blood)

    # Heart: low and anterior, toward the patient's left, in proportion to the body; cardiomegaly widens
    # it; its wall (myocardium) holds the blood of the chambers.
    heart_scale = build * (_uniform(rng, 1.3, 1.5) if findings["Cardiomegaly"] else _uniform(rng, 0.92, 1.05))
    heart_centre = (lung_z0 - _uniform(rng, 45, 60), -_uniform(rng, 20, 35), _uniform(rng, 12, 25) * heart_scale)
    heart_semi = (
        _uniform(rng, 45, 55) * (1 + (heart_scale - 1) * 0.5),
        _uniform(rng, 42, 50) * heart_scale,
        _uniform(rng, 52, 60) * heart_scale,
    )
    pericardium = grid.ellipsoid(heart_centre, tuple(a + 4.0 for a in heart_semi))
    pericardium.paint(hu, -90.0, body)  # epicardial fat
    grid.ellipsoid(heart_centre, heart_semi).paint(hu, 40.0 + 5.0 * _uniform(rng, -1, 1), body)
    grid.ellipsoid(heart_centre, tuple(a - 10.0 for a in heart_semi)).paint(hu, blood, body)
    # What the heart and the aorta cover is no longer lung: findings of the lungs stay out of it.
    mediastinal = pericardium.dense(shape) | aorta.dense(shape) | arch.dense(shape)
    lungs &= ~mediastinal
    for _, region, _, _ in lung_parts:
        region.mask &= ~mediastinal[region.slices]
    lung_parts = [(lung & ~mediastinal, region, centre, semi) for lung, region, centre, semi in lung_parts]

    trachea_y, trachea_radius = -_uniform(rng, 5, 15), _uniform(rng, 8, 10)
    carina_z = lung_z0 + _uniform(rng, 30, 45)
    grid.cylinder_z((trachea_y, 0.0), (trachea_radius + 2.5,) * 2, (carina_z, math.inf)).paint(hu, 20.0)
    grid.cylinder_z((trachea_y, 0.0), (trachea_radius,) * 2, (carina_z, math.inf)).paint(hu, -1000.0)
    for side in (-1.0, 1.0):
        hilum = (carina_z - _uniform(rng, 25, 35), trachea_y + 10.0, side * _uniform(rng, 45, 55))
        grid.capsule((carina_z, trachea_y, 0.0), hilum, trachea_radius * 0.7).paint(hu, -1000.0)

    # Spine (vertebral bodies, discs, spinal canal), ribs and sternum.
    spine_y, spine_radius = body_y * 0.62, _uniform(rng, 16, 20)
    spine = grid.cylinder_z((spine_y, 0.0), (spine_radius, spine_radius))
    spine.paint(hu, 700.0)
    grid.cylinder_z((spine_y, 0.0), (spine_radius - 3.0, spine_radius - 3.0)).paint(hu, 250.0)
    disc_phase, disc_period = _uniform(rng, 0, 28), _uniform(rng, 26, 30)
    discs = torch.remainder(grid.z - disc_phase, disc_period) < 6.0
    spine.paint(hu, 80.0, discs.expand(shape))
    grid.cylinder_z((spine_y + spine_radius + 10.0, 0.0), (8.0, 7.0)).paint(hu, 20.0)
    # Ribs run in a band just inside the fat, sloping down from the spine to the front.
    radius_sq = (grid.y / body_y) ** 2 + (grid.x / body_x) ** 2
    inner, outer = (1 - fat - 0.07) ** 2, (1 - fat - 0.02) ** 2
    band = (radius_sq > inner) & (radius_sq < outer) & ~((grid.y < 0.0) & (grid.x.abs() < 35.0))
    rib_tilt, rib_period = _uniform(rng, 25, 45), _uniform(rng, 24, 28)
    slope = rib_tilt * 0.5 * (1.0 - grid.y / body_y)
    ribs = band & (torch.remainder(grid.z + slope - _uniform(rng, 0, rib_period), rib_period) < 9.0)
    hu[ribs] = 650.0
    sternum_y = -body_y * (1 - fat) + 8.0
    grid.cylinder_z((sternum_y, 0.0), (7.0, 14.0), (lung_z0 - 60.0, lung_z0 + 90.0)).paint(hu, 400.0)

    # Findings inside the lungs, in the patient lying (the CT's) and standing (the radiograph's).
    erect = hu.clone()
    if findings["Pleural effusion"]:
        sides = [0, 1] if rng.random() < 0.5 else [int(rng.integers(2))]
        for side in sides:
            lung, region, centre, semi = lung_parts[side]
            z, y, x = grid.local(region.slices)
            dependent = (y - centre[1]) / semi[1] + (centre[0] - z) / semi[0] > _uniform(rng, 0.2, 0.7)
            lying = region.mask & dependent
            fluid = _uniform(rng, 5, 20)
            _Region(region.slices, lying).paint(hu, fluid)
            _Region(region.slices, _standing_fluid(region.mask, lying, z, x, centre, semi, side)).paint(erect, fluid)
    if findings["Consolidation"]:
        # Airspace disease filling part of one lobe: the upper or the lower lobe of a lung, split by an
        # oblique fissure that runs from high at the back to low at the front.
        lung, region, centre, semi = lung_parts[int(rng.integers(2))]
        z, y, _ = grid.local(region.slices)
        below_fissure = (z - centre[0]) / semi[0] + 0.8 * (y - centre[1]) / semi[1] < _uniform(rng, -0.1, 0.2)
        lobe = region.mask & (below_fissure if rng.random() < 0.5 else ~below_fissure)
        if not bool(lobe.any()):
            lobe = region.mask
        lobe_region = _Region(region.slices, lobe)
        focus = _random_point_in(lobe_region.dense(shape), grid, rng, region)
        extent = grid.ellipsoid(focus, tuple(_uniform(rng, 30, 55) for _ in range(3)))
        consolidation = _Region(extent.slices, extent.mask & lobe_region.dense(shape)[extent.slices])
        dense = _uniform(rng, -100, 30) + 30.0 * _smooth_noise(shape, grid.spacing, 10.0, generator)
        for volume in (hu, erect):
            consolidation.paint(volume, dense)
            consolidation.paint(volume, -950.0, vessel_field.abs() < 0.12)  # air bronchograms
    if findings["Lung nodule"]:
        for _ in range(int(rng.integers(1, 4))):
            lung, region, _, _ = lung_parts[int(rng.integers(2))]
            nodule_radius = _uniform(rng, 4, 15)
            nodule = grid.ellipsoid(_random_point_in(lung, grid, rng, region), (nodule_radius,) * 3)
            density = _uniform(rng, 20, 60)
            for volume in (hu, erect):
                nodule.paint(volume, density, lungs)

    # Quantum noise of the CT: dose and patient size vary it several-fold between scans.
    hu += math.exp(_uniform(rng, math.log(6.0), math.log(30.0))) * torch.randn(shape, generator=generator)
    return Phantom(
        hu=hu.clamp_(-1024.0, 3071.0).numpy(),
        spacing=grid.spacing,
        findings=findings,
        index=index,
        erect_hu=erect.clamp_(-1024.0, 3071.0).numpy(),
    )


def _standing_fluid(lung, lying, z, x, centre, semi, side: float) -> torch.Tensor:
    """Where the pleural fluid of ``lying`` settles when the patient stands: the lowest voxels of ``lung``,
    as many as ``lying`` holds (rounded up to whole columns along y), with the surface curving up toward
    the lateral chest wall (the meniscus).

    ``lung`` and ``lying`` are masks over one lung's box; ``z`` and ``x`` its coordinates in mm; ``side``
    -1 for the right lung, 1 for the left.
    """
    # Lower is deeper in the fluid, and the surface curves up toward the lateral wall; the fluid takes
    # the deepest voxels.
    lateral = (side * (x - centre[2]) / semi[2]).clamp_min(0.0)
    depth = ((centre[0] - z) / semi[0] + 0.5 * lateral**2).expand(lung.shape)
    count = int(lying.sum())
    if count == 0:
        return torch.zeros_like(lung)
    level = torch.topk(depth[lung], count).values[-1]
    return lung & (depth >= level)


def radiograph(phantom: Phantom, spacing: float = 2.0, seed: int = 0) -> tuple[np.ndarray, tuple[float, float]]:
    """A PA radiograph (DRR) of a phantom: line integrals of attenuation along y, as a radiograph shows them.

    The patient stands slightly turned and at a varying distance from the detector (in-plane rotation of
    up to 4 degrees, magnification 1.0-1.12); the exposure (quantum noise), the scattered radiation
    (which lowers contrast) and the detector's grey-level curve (a power law) differ between
    radiographs. These depend on ``(seed, phantom.index)`` alone, not on the findings.

    Returns ``(image, (row spacing, column spacing))``: float32 ``[H, W]`` grey levels in
    ``[0, _MAX_LINE_INTEGRAL]`` (dense tissue high) with rows running from the head down and columns
    from the patient's right to left, as a PA film is viewed, resampled to ``spacing`` mm pixels.
    """
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"radiograph: spacing must be a positive number of mm, got {spacing}")
    rng = np.random.default_rng([seed, phantom.index, 1])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    hu = torch.from_numpy(phantom.hu if phantom.erect_hu is None else phantom.erect_hu)
    dz, dy, dx = phantom.spacing
    attenuation = (_WATER_ATTENUATION_PER_MM * (1.0 + hu / 1000.0)).clamp_min(0.0)
    line_integral = attenuation.sum(dim=1) * dy  # [z, x]
    line_integral = line_integral.flip(0)  # head at the top
    height = max(2, round(line_integral.shape[0] * dz / spacing))
    width = max(2, round(line_integral.shape[1] * dx / spacing))
    line_integral = _positioned(line_integral, (dz, dx), _uniform(rng, -4.0, 4.0), _uniform(rng, 1.0, 1.12))
    resized = F.interpolate(line_integral[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    photons_per_pixel = math.exp(_uniform(rng, math.log(_PHOTONS_PER_PIXEL / 4), math.log(_PHOTONS_PER_PIXEL * 2)))
    primary = torch.exp(-resized)
    scatter = _uniform(rng, 0.05, 0.35) * _blurred(primary, _SCATTER_SIGMA_MM / spacing)
    photons = photons_per_pixel * (primary + scatter)
    noisy_photons = (photons + photons.sqrt() * torch.randn(resized.shape, generator=generator)).clamp_min(1.0)
    detected = (-torch.log(noisy_photons / photons_per_pixel)).clamp(0.0, _MAX_LINE_INTEGRAL)
    grey_levels = _MAX_LINE_INTEGRAL * (detected / _MAX_LINE_INTEGRAL) ** _uniform(rng, 0.75, 1.35)
    return grey_levels.numpy(), (spacing, spacing)


def _positioned(image: torch.Tensor, spacing: tuple[float, float], degrees: float, magnification: float) -> torch.Tensor:
    """``image`` rotated in plane about its centre and magnified, in physical space; air (0) outside."""
    height_mm, width_mm = image.shape[0] * spacing[0], image.shape[1] * spacing[1]
    angle = math.radians(degrees)
    cos, sin = math.cos(angle) / magnification, math.sin(angle) / magnification
    # affine_grid works in coordinates normalised to [-1, 1] per axis: convert through millimetres.
    theta = torch.tensor(
        [[cos, -sin * height_mm / width_mm, 0.0], [sin * width_mm / height_mm, cos, 0.0]], dtype=torch.float32
    )
    grid = F.affine_grid(theta[None], [1, 1, *image.shape], align_corners=False)
    return F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]


def _blurred(image: torch.Tensor, sigma_pixels: float) -> torch.Tensor:
    """A wide Gaussian blur (by a coarse grid and back), for the smooth scatter field."""
    factor = max(1, round(sigma_pixels / 2))
    coarse = F.avg_pool2d(image[None, None], factor, ceil_mode=True)
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets * factor / sigma_pixels) ** 2)
    kernel = kernel / kernel.sum()
    coarse = F.pad(coarse, (radius, radius, radius, radius), mode="replicate")
    coarse = F.conv2d(coarse, kernel.view(1, 1, 1, -1))
    coarse = F.conv2d(coarse, kernel.view(1, 1, -1, 1))
    return F.interpolate(coarse, size=image.shape, mode="bilinear", align_corners=False)[0, 0]


def _split_of(rng: np.random.Generator, fractions: tuple[float, float, float]) -> str:
    draw = rng.random()
    if draw < fractions[0]:
        return "train"
    return "val" if draw < fractions[0] + fractions[1] else "test"


def _write_ct(path: Path, phantom: Phantom) -> None:
    import itk  # heavy: imported only when files are written

    image = itk.image_from_array(np.round(phantom.hu).astype(np.int16))
    image.SetSpacing(tuple(float(s) for s in reversed(phantom.spacing)))  # ITK speaks (x, y, z)
    shape = phantom.hu.shape
    # The volume centre sits at the physical origin, as the coordinates of the generator assume.
    image.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(reversed(shape), reversed(phantom.spacing))))
    itk.imwrite(image, str(path), compression=True)


def _write_xray(path: Path, image: np.ndarray, spacing: tuple[float, float]) -> None:
    import itk

    grey = np.round(image / _MAX_LINE_INTEGRAL * 65535.0).astype(np.uint16)
    itk_image = itk.image_from_array(grey)
    itk_image.SetSpacing((float(spacing[1]), float(spacing[0])))
    itk.imwrite(itk_image, str(path))


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    count: int = 200,
    seed: int = 0,
    settings: PhantomSettings | None = None,
    progress: bool = True,
    workers: int | None = 1,
) -> Path:
    """Write ``count`` phantoms as CT (NIfTI) and radiograph (16-bit PNG) files with a manifest CSV.

    Layout: ``ct/phantom_00000.nii.gz``, ``xray/phantom_00000.png``, ``manifest.csv`` with the columns
    ``path, modality, id, group, split`` and one 0/1 column per finding, and ``phantoms.json`` describing
    the data set. Both images of a phantom share its group and split. A directory that already holds the
    same data set (same count, seed and settings, per ``phantoms.json``) is left as it is; otherwise
    files of the same names are overwritten.

    ``workers`` processes generate and write the phantoms in parallel (None: one per core). Each phantom
    depends only on the seed and its number, so the data set is the same for any number of workers. The
    processes are spawned, so a script that asks for more than one must start from an
    ``if __name__ == "__main__":`` guard, as with any spawned multiprocessing.

    Returns:
        The manifest's path.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"write_phantom_dataset: count must be a positive int, got {count!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"write_phantom_dataset: workers must be a positive int or None, got {workers!r}")
    settings = settings or PhantomSettings()
    out_dir = Path(out_dir)
    description = json.dumps({"count": count, "seed": seed, "settings": dataclasses.asdict(settings)}, sort_keys=True)
    manifest = out_dir / MANIFEST_NAME
    description_path = out_dir / DESCRIPTION_NAME
    if manifest.is_file() and description_path.is_file() and description_path.read_text(encoding="utf-8") == description:
        return manifest
    (out_dir / "ct").mkdir(parents=True, exist_ok=True)
    (out_dir / "xray").mkdir(parents=True, exist_ok=True)
    write_one = functools.partial(_write_phantom_files, out_dir, seed=seed, settings=settings)
    bar = functools.partial(tqdm, total=count, desc="phantoms", disable=not progress)
    if workers == 1:
        pairs = list(bar(map(write_one, range(count))))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, count), mp_context=context, initializer=_one_torch_thread) as pool:
            pairs = list(bar(pool.map(write_one, range(count), chunksize=4)))
    rows = [row for pair in pairs for row in pair]
    temporary = manifest.with_name(manifest.name + ".tmp")
    with open(temporary, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "modality", "id", "group", "split", *PHANTOM_FINDINGS])
        writer.writerows(rows)
    os.replace(temporary, manifest)
    description_path.write_text(description, encoding="utf-8")
    return manifest


def _write_phantom_files(out_dir: Path, index: int, seed: int, settings: PhantomSettings) -> list[list]:
    """Generate phantom ``index`` and write its CT and radiograph; returns their two manifest rows."""
    phantom = generate_phantom(index, seed, settings)
    name = f"phantom_{index:05d}"
    split = _split_of(np.random.default_rng([seed, index, 2]), settings.split_fractions)
    labels = [int(phantom.findings[finding]) for finding in PHANTOM_FINDINGS]
    ct_path = Path("ct") / f"{name}.nii.gz"
    xray_path = Path("xray") / f"{name}.png"
    _write_ct(out_dir / ct_path, phantom)
    _write_xray(out_dir / xray_path, *radiograph(phantom, settings.xray_spacing, seed))
    return [
        [ct_path.as_posix(), CT_MODALITY, f"{name}_ct", name, split, *labels],
        [xray_path.as_posix(), XRAY_MODALITY, f"{name}_xray", name, split, *labels],
    ]


def _one_torch_thread() -> None:
    # Parallel workers each take one core; torch's own threads would only oversubscribe them.
    torch.set_num_threads(1)


def phantom_manifest(manifest: str | os.PathLike, transform=None, cache=None, on_error: str = "raise"):
    """The :class:`mmv.data.Manifest` of a phantom data set, with the findings as its labels, opened by
    :func:`mmv.data.open_dataset`; each record's split and group are its phantom's.

    ``transform``, ``cache`` and ``on_error`` are passed to the Manifest.
    """
    spec = DatasetSpec("manifest", manifest, id_column="id", label_columns=PHANTOM_FINDINGS)
    return open_dataset(spec, transform=transform, cache=cache, on_error=on_error)
