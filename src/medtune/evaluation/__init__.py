"""What is stored and read back: the SQLite store, metrics, evidence, the verdict and its diagnosis."""
