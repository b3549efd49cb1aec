"""PyTorch stage networks -> ONNX graphs, bundles with a manifest, and their validation."""
