"""cbtm: Cluster-Branch-Train-Merge.

Cluster a corpus without metadata (tf-idf -> SVD -> balanced k-means), train one expert language
model per cluster, and merge the experts at inference as a sparse ensemble.
"""

__version__ = "0.1.0"

from . import ops
from .embed import TfidfEmbedder
from .ensemble import Ensemble
from .kmeans import BalancedKMeans
from .router import Router

__all__ = ["BalancedKMeans", "Ensemble", "Router", "TfidfEmbedder", "ops", "__version__"]
