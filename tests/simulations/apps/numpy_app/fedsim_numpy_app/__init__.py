"""fedsim-numpy-app: a deterministic Flower app whose final arrays are known by hand."""
