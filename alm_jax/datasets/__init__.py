"""Bundled data sets (see `uci/README.md` for sources and licences)."""

from ._uci import UCI_DATASETS as UCI_DATASETS, RegressionData as RegressionData, load_uci as load_uci
