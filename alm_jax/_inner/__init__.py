from ._base import InnerResult as InnerResult, InnerSolver as InnerSolver, Problem as Problem
from ._bcd import bcd as bcd
from ._first_order import adam as adam, lbfgs as lbfgs
from ._gn import gn as gn
from ._lm import (
    LMOptions as LMOptions,
    cg as cg,
    initial_damping as initial_damping,
    lm as lm,
    lm_iteration as lm_iteration,
)
from ._registry import INNER_SOLVERS as INNER_SOLVERS, get_inner as get_inner
