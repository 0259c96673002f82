"""pytorchexample: Flower's quickstart-pytorch on offline tensors."""
