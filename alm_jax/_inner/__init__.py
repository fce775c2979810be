from ._lm import (
    LMOptions as LMOptions,
    initial_damping as initial_damping,
    lm_iteration as lm_iteration,
)
