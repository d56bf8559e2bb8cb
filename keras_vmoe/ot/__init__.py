"""Optimal-transport solvers used by the OT routers.

- `sinkhorn_plan`: entropic OT (Sinkhorn), for the Sinkhorn Token Choice and
  Sinkhorn Expert Choice routers (docs/routers.md, "Sinkhorn Token Choice").
- `ksparse_simplex_projection`, `sparse_ot_plan`,
  `sparse_ot_plan_with_top_k`: sparsity-constrained OT (docs/routers.md,
  "Sparsity-constrained Expert Choice").
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
