"""Optimal-transport solvers used by the OT routers.

- `sinkhorn_plan`: entropic OT (Sinkhorn), routers 2 and 4 of ROUTERS.md.
- `ksparse_simplex_projection`, `sparse_ot_plan`,
  `sparse_ot_plan_with_top_k`: sparsity-constrained OT, router 5 of
  ROUTERS.md.
"""

from keras_vmoe.ot.sinkhorn import sinkhorn_plan
from keras_vmoe.ot.sparse import (
    ksparse_simplex_projection,
    sparse_ot_plan,
    sparse_ot_plan_with_top_k,
)

__all__ = [
    "ksparse_simplex_projection",
    "sinkhorn_plan",
    "sparse_ot_plan",
    "sparse_ot_plan_with_top_k",
]
