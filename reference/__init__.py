"""NumPy float64 references: an obvious oracle and a kernel-order mirror per algorithm."""
