"""Adapters that make a framework's model a ``agents.app.Trainer``: PyTorch, scikit-learn."""
