"""Generated data: a DeepLesion-format CT release (with true masks) and EM-like cell images.

DeepLesion format: CT-like 16-bit PNG series, ``DL_info.csv`` and true masks.

The release written by :func:`generate_demo_data` has exactly the on-disk format of NIH DeepLesion:
``Images_png/{patient:06d}_{study:02d}_{series:02d}/{slice:03d}.png``
holding HU + 32768 as uint16, and ``DL_info.csv`` with one row per lesion in the real file's text
formatting (same header, quoted ``"x, y"`` cells, 6 significant digits). RECIST marks are *measured*
with :func:`medseg.lesion.measure_recist` on each lesion's true mask on its key slice, the slice
where the lesion is largest. Unlike the real release it also has the true masks:
``Masks_png/<series>/<slice>.png`` (uint8 instance ids) for every written slice a lesion shows on;
on a key slice, id *k* is the *k*-th CSV row of that key slice, and on a neighbouring slice the ids
are those of the key slice whose lesions it shows (lesions of two key slices never share a slice).

The anatomy is a parametric trunk along a body axis ``t`` (mm, from the lung apices at 0 to the hips
at ≈ 650): body outline, subcutaneous fat, muscle, lungs with vessels, mediastinum, heart and great
vessels, liver, spleen, stomach, pancreas, kidneys, bowel, bladder, spine with discs, ribs, pelvis
and the scanner table. Each series covers a stretch of ``t``, so neighbouring slices change smoothly.
Lesions are irregular 3-D ellipsoids of eight coarse types placed in their host tissue; some touch
each other, some sit on an organ border.

As in the real file, ``Slice_range`` is per key slice: each key slice gets its own block of 9–13
contiguous slices (occasionally cut at the series start), and a folder with two key slices holds two
blocks, possibly with a gap between them. Most training rows have ``Coarse_lesion_type`` −1; about 3 %
of rows are ``Possibly_noisy`` = 1, and their marks are deliberately off by ~2 px (box and
diameters follow the moved marks), so only the other rows match the true masks exactly.

The package, by concern:

* :mod:`~medseg.data.synthetic.shapes` — irregular ellipses (level functions, filled polygons);
* :mod:`~medseg.data.synthetic.plan` — patients, series, key-slice groups (the random plan);
* :mod:`~medseg.data.synthetic.anatomy` — the trunk's anatomy rendered at a body-axis position;
* :mod:`~medseg.data.synthetic.lesions` — lesions placed in their host tissue, validated;
* :mod:`~medseg.data.synthetic.release` — :func:`generate_demo_data`, the release writer;
* :mod:`~medseg.data.synthetic.cells` — :func:`generate_cells_data`, EM-like cell images.

Every file is written through :mod:`medseg.io` (atomically).

Example:
    >>> root = generate_demo_data("data/demo", patients=4, progress=False)
    >>> (root / "DL_info.csv").exists()
    True
    >>> cells = generate_cells_data("data/cells", images=4, seed=0)
"""

from __future__ import annotations

from medseg.data.synthetic.cells import CELLS_IMAGES, generate_cells_data, render_cells
from medseg.data.synthetic.release import generate_demo_data

__all__ = ["CELLS_IMAGES", "generate_cells_data", "generate_demo_data", "render_cells"]
