"""Token rows for the text tests: the encoder's cost grows with the padded length, so the tests
run on the shorter reviews of the committed corpus subsets, padded to the longest of them."""
from __future__ import annotations

import numpy as np

MAX_TOKENS = 40  # reviews of at most 40 tokens: 2,650 of the 3,000 calibration rows, 1,748 of the 2,000 test rows


def short_rows(data: dict[str, np.ndarray], rows: int, max_length: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    """The first ``rows`` rows of ``data`` (token arrays ``[N, L]`` and labels ``[N]``) at most
    ``max_length`` tokens long, their padding cut to the longest of them."""
    lengths = data["attention_mask"].sum(axis=1)
    keep = np.flatnonzero(lengths <= max_length)[:rows]
    if len(keep) < rows:
        raise ValueError(f"only {len(keep)} rows of at most {max_length} tokens, {rows} asked")
    length = int(lengths[keep].max())
    return {k: v[keep][:, :length] if v.ndim == 2 else v[keep] for k, v in data.items()}
