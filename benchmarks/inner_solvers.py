"""Inner solvers compared on the UCI quick suite (issue 4).

Every inner solver of `alm_jax.inner` runs inside the same ALM (the library's
default policy and inner step caps), through `uci_suite.py`: same data,
splits, initial weights and wall-clock budget (compilation included).

    python benchmarks/inner_solvers.py                   # 4 small sets, 2 splits, 10 s
    python benchmarks/inner_solvers.py --datasets yacht --splits 1 --budget 5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import uci_suite  # noqa: E402  (sets XLA_FLAGS before jax is imported)

from alm_jax.inner import INNER_SOLVERS  # noqa: E402


def main(argv=None):
    rest = list(sys.argv[1:] if argv is None else argv)
    variants = {f"alm-{name}": {"inner": name} for name in INNER_SOLVERS}
    if "--datasets" not in rest:
        rest += ["--datasets", "yacht", "energy", "concrete", "wine-quality-red"]
    if "--out" not in rest:
        rest += ["--out", "benchmarks/out/inner"]
    if "--methods" not in rest:
        rest += ["--methods", *variants]
    uci_suite.main(rest, alm_variants=variants)


if __name__ == "__main__":
    main()
