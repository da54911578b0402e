"""Memory banks for federated PatchCore-style anomaly detection.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2021, arXiv:2106.08265.
Agents keep a greedy k-center coreset of their patch features (``local_coreset``), the
server merges the uploaded banks into one global bank (``merge_banks``), and a patch's
anomaly score is its distance to the nearest bank row (``nearest_distances``). Greedy
k-center is Gonzalez, "Clustering to minimize the maximum intercluster distance", 1985: a
2-approximation of the optimal covering radius (``coverage_radius``).
"""

from .coreset import coverage_radius, greedy_k_center, local_coreset
from .merge import merge_banks
from .scoring import nearest_distances, roc_auc

__all__ = [
    "coverage_radius",
    "greedy_k_center",
    "local_coreset",
    "merge_banks",
    "nearest_distances",
    "roc_auc",
]
