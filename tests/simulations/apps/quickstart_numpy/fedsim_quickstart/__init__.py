"""fedsim-quickstart: the shape of Flower's quickstart-numpy example, deterministic."""
