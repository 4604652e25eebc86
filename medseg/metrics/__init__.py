"""Segmentation metrics (transitional: the old module was renamed to :mod:`medseg.metrics.lesion`;
the next commit splits it by concern)."""

from medseg.metrics.lesion import *  # noqa: F403
from medseg.metrics.lesion import (  # noqa: F401
    MATCH_RULES,
    MatchRule,
    _gather_objects,
    _mask2d,
    _mean,
    _recist_mm,
    _sape,
    _type_name,
)
from medseg.metrics.lesion import __all__  # noqa: F401
