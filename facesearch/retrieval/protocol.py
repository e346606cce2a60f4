"""The retrieval protocol: which images may be used, one query per identity, the rest gallery.

Shared by the split stage and ``python -m facesearch evaluate``, so a model is
scored on any folder exactly as on the pipeline's own test identities.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from facesearch.data import manifest as M


def eligible_images(manifest: pd.DataFrame, min_images: int) -> pd.DataFrame:
    """Kept images of identities with at least ``min_images`` kept images, sorted by crop path."""
    kept = manifest[(manifest[M.STATUS] == M.Status.KEPT) & manifest[M.IDENTITY].notna()]
    counts = kept.groupby(M.IDENTITY)[M.CROP_PATH].transform("size")
    return kept[counts >= min_images].sort_values(M.CROP_PATH, kind="stable").reset_index(drop=True)


def choose_queries(test_images: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One seeded query per identity; every other image of the identity goes to the gallery."""
    is_query = np.zeros(len(test_images), dtype=bool)
    for _, positions in sorted(test_images.groupby(M.IDENTITY).indices.items()):
        is_query[positions[rng.integers(len(positions))]] = True
    return test_images[is_query].reset_index(drop=True), test_images[~is_query].reset_index(drop=True)
