"""DP pools: pool 0 (the data directory's file system) and pools made of pool volumes.

A pool other than 0 is built from LDEVs handed over as pool volumes (vspemu has no parity groups: a pool
volume is an LDEV of pool 0 with no LU path and no pair). Its capacity is the sum of its pool volumes; what its
DP volumes use is what their sparse files really hold (st_blocks). The pool volumes' own files stay sparse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

POOL_ATTRIBUTE = "POOL"  # the LDEV attribute of a pool volume
MAX_POOL_ID = 127
DEFAULT_POOL_NAME = "vspemu-pool0"
POOL_TYPES = ("HDP", "HDT", "HRT", "HTI", "DP")


@dataclass
class Pool:
    pool_id: int
    name: str
    pool_type: str = "HDP"
    warning_threshold: int = 70
    depletion_threshold: int = 80
    ldev_ids: list[int] = field(default_factory=list)  # its pool volumes (empty for pool 0)
