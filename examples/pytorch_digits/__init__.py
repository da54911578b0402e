"""A small PyTorch CNN on scikit-learn's 8x8 digits, as an agent's own model."""
