"""Which transformers' continuous-batching pool a test is written for: the newest's sector pool (one flat
`cache_tensor` cut into sectors, from 5.18) or 5.17's layer pool (a K and a V tensor per layer), so that each
runs where its pool is and says why it skips elsewhere (the GPU machine users meet has 5.17)."""

from __future__ import annotations

import pytest
import transformers
from packaging.version import Version

__all__ = ["SECTOR_POOL"]

SECTOR_POOL = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.18"),
    reason=f"transformers {transformers.__version__} has the layer pool (5.17); these tests are the sector "
    "pool's (5.18 on): test_hf_continuous_batching_layer_pool.py is the layer pool's",
)
