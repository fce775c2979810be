"""alm_jax: training neural networks as an optimal control problem.

The training problem is lifted (every sample's hidden states become unknowns,
the layer equations constraints) and solved by an augmented Lagrangian method
whose inner problems are solved by structure-exploiting Levenberg–Marquardt.
"""

from . import datasets as datasets
from . import inner as inner
from . import losses as losses
from . import policies as policies
from ._alm import ALMInfo as ALMInfo, ALMSolver as ALMSolver, ALMState as ALMState, alm as alm
from ._fit import FitResult as FitResult, History as History, fit as fit
from ._layers import Layer as Layer
from ._sharding import sample_mesh as sample_mesh, shard_samples as shard_samples
from ._functional import (
    apply_updates as apply_updates,
    augmented_lagrangian as augmented_lagrangian,
    augmented_lagrangian_grad as augmented_lagrangian_grad,
    constraints as constraints,
    dense_lm_step as dense_lm_step,
    forward_states as forward_states,
    lm_step as lm_step,
    residual as residual,
)

__version__ = "0.1.0"
