"""Hand-made inputs shared by the metrics tests: a confusion matrix realised as pixels, a four-lesion
slice with a merge, a miss and a false positive, and filled ellipses of known size."""

from __future__ import annotations

import cv2
import numpy as np

#: p_ij = pixels of true class i predicted as j; rows sum to 55, 27, 18 and columns to 57, 28, 15
P = np.array([[50, 3, 2], [6, 20, 1], [1, 5, 12]])


def pixels_from(p: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (target, pred) pixel lists realising confusion matrix ``p``."""
    t, q = [], []
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            t += [i] * int(p[i, j])
            q += [j] * int(p[i, j])
    order = np.random.default_rng(seed).permutation(len(t))
    return np.array(t)[order], np.array(q)[order]


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Four true lesions and three predicted components on a 40×40 image.

    A (1) and B (2): 5×5 squares 2 px apart, both covered by one predicted 5×12 bar (a merge);
    C (3): missed; E (4): 7×7, predicted as 7×6 inside it; D: a predicted 4×4 blob on nothing.
    """
    true = np.zeros((40, 40), np.int32)
    true[5:10, 5:10] = 1
    true[5:10, 12:17] = 2
    true[25:30, 25:30] = 3
    true[25:32, 5:12] = 4
    pred = np.zeros((40, 40), np.uint8)
    pred[5:10, 5:17] = 1  # merge of A and B (60 px)
    pred[25:32, 6:12] = 1  # E (42 px)
    pred[33:37, 33:37] = 1  # D, false positive
    return pred, true


def ellipse(shape: tuple[int, int], centre: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
    """A filled axis-aligned ellipse; semi-axes (a, b) px span 2a + 1 by 2b + 1 pixels."""
    m = np.zeros(shape, np.uint8)
    cv2.ellipse(m, centre, axes, 0, 0, 360, 1, -1)
    return m
