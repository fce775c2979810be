"""Training losses for `alm_jax.alm(loss=...)`: least squares and, by
generalised Gauss–Newton, softmax cross-entropy (see `alm_jax._losses`)."""

from ._losses import (
    Loss as Loss,
    get_loss as get_loss,
    softmax_cross_entropy as softmax_cross_entropy,
    squared as squared,
)
