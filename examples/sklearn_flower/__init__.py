"""A Flower NumPyClient around scikit-learn's LogisticRegression on the digits."""
