"""A federated PatchCore (memory-bank anomaly detection) on scikit-learn's 8x8 digits."""
