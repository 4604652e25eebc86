"""The plan of a generated release: patients, series, key-slice groups and lesions, drawn at random.

Everything random about a release except the rendering noise is decided here, from the one
``numpy.random.Generator`` of :func:`medseg.data.synthetic.generate_demo_data`: the patients
(:func:`make_patients`, with the official ≈ 70/15/15 split by patient), each series' body region,
geometry and anatomy details (:func:`make_series`) and its key slices with their slice blocks
(:func:`plan_groups`). Positions along the body axis ``t`` are in mm, from the lung apices (0) to
the hips (≈ 650); in-plane positions in pixels.

Example:
    >>> rng = np.random.default_rng(0)
    >>> p = make_patients(rng, 3)[0]
    >>> se = make_series(rng, p, study=1, series_id=1, age=p.age, size=128)
    >>> plan_groups(rng, se); se.name, len(se.groups) >= 1
    ('000001_01_01', True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medseg.data.deeplesion.format import format_numbers
from medseg.data.synthetic.shapes import Shape, choice, random_harmonics, smoothstep

__all__ = ["REGIONS", "Group", "Lesion", "Patient", "Series", "body_axes", "make_patients", "make_series",
           "plan_groups"]

#: body regions a series can cover: t range (mm) of its key slices, probability, lesion kinds
REGIONS = {
    "chest": ((40.0, 240.0), 0.45,
              {"lung": 0.5, "mediastinum": 0.3, "soft_tissue": 0.08, "bone": 0.05, "liver": 0.07}),
    "abdomen": ((250.0, 430.0), 0.42,
                {"liver": 0.32, "abdomen": 0.3, "kidney": 0.16, "soft_tissue": 0.08, "bone": 0.05,
                 "lung": 0.04, "mediastinum": 0.05}),
    "pelvis": ((455.0, 610.0), 0.13,
               {"pelvis": 0.55, "abdomen": 0.1, "soft_tissue": 0.15, "bone": 0.15, "kidney": 0.05}),
}  # fmt: skip


@dataclass
class Patient:
    """Patient-level anatomy and metadata (shared by all the patient's studies)."""

    index: int
    split: int
    gender: str
    age: int | None
    scale: float
    fat_mm: float
    muscle_mm: float
    body_harm: tuple[tuple[int, float, float], ...]
    organ_harm: tuple[tuple[int, float, float], ...]
    hu_fat: float
    hu_muscle: float
    hu_liver: float
    gallbladder: bool
    disc_phase: float
    rib_phase: tuple[float, ...]


@dataclass
class Lesion:
    """A lesion: an irregular ellipsoid (pixels in-plane, mm along t) with its HU profile."""

    kind: str
    cx: float
    cy: float
    a: float  #: in-plane semi-axes, mm
    b: float
    c: float  #: semi-axis along t, mm
    cz: float  #: centre along t, mm
    ang: float
    harm: tuple[tuple[int, float, float], ...]
    drift: tuple[float, ...]  #: phase drift of each harmonic from centre to tip (keeps the area)
    hu_edge: float
    hu_centre: float
    window: tuple[float, float] = (-175.0, 275.0)

    def section(self, t: float, spacing: float) -> Shape | None:
        """The cross-section at ``t`` in pixels, or None where the lesion is absent."""
        s2 = 1.0 - ((t - self.cz) / self.c) ** 2
        if s2 <= 0.0:
            return None
        s = math.sqrt(s2)
        z = (t - self.cz) / self.c
        harm = tuple((k, a, p + d * z) for (k, a, p), d in zip(self.harm, self.drift))
        return Shape(self.cx, self.cy, self.a * s / spacing, self.b * s / spacing, self.ang, harm)


@dataclass
class Group:
    """One key slice: its lesions (in CSV row order) and the block of slices written around it."""

    key: int
    first: int
    last: int
    lesions: list[Lesion] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Series:
    """One CT series: geometry, its own random anatomy details, and its key-slice groups."""

    patient: Patient
    study: int
    series_id: int
    age: int | None
    region: str
    interval: float
    spacing: float
    spacing_text: str
    size: int
    t0: float
    bx: float
    by: float
    noise: float
    enh: float
    table_gap: float
    lung_vessels: np.ndarray
    liver_vessels: np.ndarray
    bowel: np.ndarray
    texture: np.ndarray  #: (2, 24, 24) coarse random fields, upsampled per series when rendered
    groups: list[Group] = field(default_factory=list)
    #: per-series arrays built on first use and dropped after the series is written (memory)
    cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """Folder name ``{patient:06d}_{study:02d}_{series:02d}``."""
        return f"{self.patient.index:06d}_{self.study:02d}_{self.series_id:02d}"

    def t(self, index: int) -> float:
        """Body-axis position (mm) of slice ``index`` (1-based)."""
        return self.t0 + (index - 1) * self.interval



def body_axes(p: Patient, t: float) -> tuple[float, float]:
    """Body half-width and half-depth (mm) at ``t``."""
    ts = (0.0, 100.0, 250.0, 350.0, 450.0, 550.0, 650.0)
    a = np.interp(t, ts, (140.0, 165.0, 160.0, 150.0, 156.0, 168.0, 166.0))
    b = np.interp(t, ts, (100.0, 112.0, 115.0, 118.0, 116.0, 112.0, 108.0))
    if p.gender == "F":
        a *= 0.95 + 0.08 * smoothstep(t, 420, 560)
    return float(a * p.scale), float(b * p.scale)


def make_patients(rng: np.random.Generator, patients: int) -> list[Patient]:
    """Patients with their anatomy and the official split (≈70/15/15, by patient, none empty)."""
    n_val = max(1, round(0.15 * patients))
    n_test = max(1, round(0.15 * patients))
    split = np.ones(patients, int)
    order = rng.permutation(patients)
    split[order[:n_val]] = 2
    split[order[n_val : n_val + n_test]] = 3
    out = []
    for i in range(patients):
        gender = "F" if rng.random() < 0.48 else "M"
        out.append(
            Patient(
                index=i + 1,
                split=int(split[i]),
                gender=gender,
                age=None if rng.random() < 0.05 else int(rng.integers(22, 86)),
                scale=float(rng.uniform(0.88, 1.1)),
                fat_mm=float(rng.uniform(8, 28) * (1.15 if gender == "F" else 1.0)),
                muscle_mm=float(rng.uniform(8, 14)),
                body_harm=random_harmonics(rng, (2, 3, 4), 0.035),
                organ_harm=random_harmonics(rng, (2, 3, 4), 0.06),
                hu_fat=float(rng.uniform(-115, -90)),
                hu_muscle=float(rng.uniform(38, 55)),
                hu_liver=float(rng.uniform(55, 75)),
                gallbladder=bool(rng.random() < 0.7),
                disc_phase=float(rng.uniform(0, 2 * math.pi)),
                rib_phase=tuple(float(x) for x in rng.uniform(0, 2 * math.pi, 18)),
            )
        )
    return out


def make_series(
    rng: np.random.Generator, p: Patient, study: int, series_id: int, age: int | None, size: int
) -> Series:
    """A series: region, slice interval, pixel spacing, position and its random anatomy details."""
    region = str(choice(rng, list(REGIONS), [r[1] for r in REGIONS.values()]))
    interval = float(choice(rng, (5.0, 2.5, 2.0, 1.0), (0.45, 0.15, 0.15, 0.25)))
    lo, hi = REGIONS[region][0]
    a_max = max(body_axes(p, t)[0] for t in np.linspace(lo - 40, hi + 40, 9))
    # the field of view is chosen to fit the patient, so the pixel spacing follows the body size
    fov = float(np.clip(round(2 * a_max * rng.uniform(1.12, 1.32)), 0.6 * 512, 0.98 * 512))
    spacing = round(fov / 512, 2) if rng.random() < 0.15 else fov / 512
    spacing *= 512 / size
    n_lv, n_bw = int(rng.integers(50, 80)), int(rng.integers(70, 100))
    lung_vessels = np.column_stack([
        rng.choice([-1, 1], n_lv) * rng.uniform(0.12, 0.85, n_lv),
        rng.uniform(-0.7, 0.75, n_lv),
        rng.uniform(1.0, 3.5, n_lv),
        t1 := rng.uniform(-60, 300, n_lv),
        t1 + rng.uniform(20, 160, n_lv),
    ])  # fmt: skip
    lung_vessels[:, 2] *= 1.6 - np.abs(lung_vessels[:, 0])  # thicker towards the hila
    liver_vessels = np.column_stack([
        rng.uniform(-0.85, -0.05, 12), rng.uniform(-0.7, 0.5, 12), rng.uniform(1.5, 5.0, 12),
        t2 := rng.uniform(180, 380, 12), t2 + rng.uniform(20, 90, 12),
    ])  # fmt: skip
    oral = bool(rng.random() < 0.4)
    bowel = np.column_stack([
        rng.uniform(-0.85, 0.85, n_bw), rng.uniform(-0.9, 0.45, n_bw), rng.uniform(10, 26, n_bw),
        rng.uniform(270, 660, n_bw), rng.uniform(15, 45, n_bw),
        rng.choice(3, n_bw, p=[0.55, 0.3, 0.15] if oral else [0.65, 0.35, 0.0]),
    ])  # fmt: skip
    return Series(
        patient=p,
        study=study,
        series_id=series_id,
        age=age,
        region=region,
        interval=interval,
        spacing=float(spacing),
        spacing_text=format_numbers([spacing, spacing, interval]),
        size=size,
        t0=0.0,
        bx=size / 2 + float(rng.normal(0, 0.012 * size)),
        by=size / 2 - 0.035 * size + float(rng.normal(0, 0.012 * size)),
        noise=float(rng.uniform(10, 15)),
        enh=float(rng.uniform(0.6, 1.1)),
        table_gap=float(rng.uniform(12, 35)),
        lung_vessels=lung_vessels.astype(np.float32),
        liver_vessels=liver_vessels.astype(np.float32),
        bowel=bowel.astype(np.float32),
        texture=rng.standard_normal((2, 24, 24)).astype(np.float32),
    )


def plan_groups(rng: np.random.Generator, se: Series) -> None:
    """Key slices of the series and their slice blocks; sets ``se.t0``.

    Consecutive key slices sit so far apart that no lesion of one reaches the other's block (a
    lesion is at most 30 mm deep on each side).
    """
    lo, hi = REGIONS[se.region][0]
    iv = se.interval
    n_groups = 1 if rng.random() < 0.8 else 2
    halves = [(int(rng.integers(4, 7)), int(rng.integers(4, 7))) for _ in range(n_groups)]
    keys_t = [float(rng.uniform(lo, hi))]
    for g in range(1, n_groups):
        gap = (halves[g - 1][1] + halves[g][0]) * iv + 70.0 + float(rng.uniform(0, 40))
        keys_t.append(keys_t[-1] + gap)
    if rng.random() < 0.08:  # key slice at the very start of the series (a truncated block)
        t0 = keys_t[0] - float(rng.integers(0, 3)) * iv
    else:
        t0 = keys_t[0] - halves[0][0] * iv - float(rng.uniform(0, 80))
    se.t0 = t0
    for kt, (below, above) in zip(keys_t, halves):
        key = int(round((kt - t0) / iv)) + 1
        se.groups.append(Group(key=key, first=max(1, key - below), last=key + above))

