"""DICOM series: find them in a hospital folder, read them as HU volumes, read their labels.

This is medseg's one DICOM reader; the ``dicom`` training dataset and batch inference share it.

============================ ===============================================================
module                       what it does
============================ ===============================================================
:mod:`.records`              the records: InstanceHeader, SeriesInfo, SeriesGeometry, Volume
:mod:`.discover`             :func:`find_series`: walk a folder, read each header once, group
                             instances into series, say why every other file is skipped
:mod:`.series`               :func:`series_geometry` (slice order and geometry), HU pixels
                             (:func:`read_series`), the window rule (:func:`dicom_window`)
:mod:`.labels`               SEG / RTSTRUCT / NIfTI labels → a class map on the series' grid
:mod:`.dataset`              :class:`DicomDataset` (``data.name: dicom``)
:mod:`.decoders`             pixel-data decoders for every transfer syntax a PACS sends
============================ ===============================================================

Conventions: volume arrays are ``(Z, H, W)`` = (slice, row, column), slices ascending along the
slice normal. Patient coordinates are DICOM's (LPS, mm). The centre of pixel ``(r, c)`` of
slice ``k`` lies at ``positions[k] + c·sx·direction[0] + r·sy·direction[1]``.

Example:
    >>> series, skipped = find_series("/data/hospital_export")
    >>> vol = read_series(series[0])
    >>> vol.hu.shape, vol.spacing                              # (Z, H, W), (sz, sy, sx) mm
    >>> labels = read_seg_labels(series[0].labels[0].path, vol)  # (Z, H, W) class map
"""

from __future__ import annotations

from medseg.data.dicom.dataset import DicomDataset
from medseg.data.dicom.discover import (
    DICOMDIR_SOP_CLASS,
    RTSTRUCT_SOP_CLASS,
    SEG_SOP_CLASSES,
    HeaderRecord,
    find_series,
    group_headers,
    list_files,
    orientation_name,
    read_header,
    split_by_orientation,
)
from medseg.data.dicom.labels import read_nifti_labels, read_rtstruct_labels, read_seg_labels
from medseg.data.dicom.records import (
    InstanceHeader,
    LabelFile,
    SeriesGeometry,
    SeriesInfo,
    SkippedFile,
    Volume,
    series_key,
)
from medseg.data.dicom.series import (
    PLUGIN_HELP,
    dicom_window,
    dicom_windows,
    header_window,
    read_frames_hu,
    read_instance_hu,
    read_series,
    read_series_hu,
    series_geometry,
    volume_of,
)

__all__ = [
    "DICOMDIR_SOP_CLASS",
    "PLUGIN_HELP",
    "RTSTRUCT_SOP_CLASS",
    "SEG_SOP_CLASSES",
    "DicomDataset",
    "HeaderRecord",
    "InstanceHeader",
    "LabelFile",
    "SeriesGeometry",
    "SeriesInfo",
    "SkippedFile",
    "Volume",
    "dicom_window",
    "dicom_windows",
    "find_series",
    "group_headers",
    "header_window",
    "list_files",
    "orientation_name",
    "read_frames_hu",
    "read_header",
    "read_instance_hu",
    "read_nifti_labels",
    "read_rtstruct_labels",
    "read_seg_labels",
    "read_series",
    "read_series_hu",
    "series_geometry",
    "series_key",
    "split_by_orientation",
    "volume_of",
]
