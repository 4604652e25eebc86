"""medseg: medical-image lesion segmentation — data, training, inference and tracking."""

__version__ = "0.1.0"
