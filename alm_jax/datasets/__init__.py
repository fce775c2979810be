"""Bundled data sets (see `uci/README.md` and `digits/README.md` for sources and licences)."""

from ._digits import ClassificationData as ClassificationData, load_digits as load_digits
from ._uci import UCI_DATASETS as UCI_DATASETS, RegressionData as RegressionData, load_uci as load_uci
