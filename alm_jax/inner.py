"""Inner solvers for the augmented Lagrangian subproblem.

Pass one to `alm_jax.alm(inner=...)` or `alm_jax.fit(..., inner=...)`, by name
("lm", "gn", "cg", "lbfgs", "adam", "bcd") or as an object from these
factories to set its options.
"""

from ._inner import (
    INNER_SOLVERS as INNER_SOLVERS,
    InnerResult as InnerResult,
    InnerSolver as InnerSolver,
    Problem as Problem,
    adam as adam,
    bcd as bcd,
    cg as cg,
    get_inner as get_inner,
    gn as gn,
    lbfgs as lbfgs,
    lm as lm,
)
