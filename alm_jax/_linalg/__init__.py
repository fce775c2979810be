from ._dense import dense_step as dense_step
from ._schur import default_chunk as default_chunk, num_weights as num_weights
from ._matfree import explicit_fits as explicit_fits
from ._step import matfree_step as matfree_step, structured_step as structured_step
