"""Penalty/tolerance policies for `alm_jax.alm` (see `alm_jax._policies`)."""

from ._policies import (
    POLICIES as POLICIES,
    AlgencanState as AlgencanState,
    AlpaqaState as AlpaqaState,
    BertsekasState as BertsekasState,
    LancelotState as LancelotState,
    Policy as Policy,
    algencan as algencan,
    alpaqa as alpaqa,
    bertsekas as bertsekas,
    default as default,
    get_policy as get_policy,
    lancelot as lancelot,
)
