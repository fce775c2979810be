from ._dense import dense_step as dense_step
from ._schur import (
    default_chunk as default_chunk,
    num_weights as num_weights,
    structured_step as structured_step,
)
from ._matfree import explicit_fits as explicit_fits, matfree_step as matfree_step
