"""Export to ONNX/TensorRT and the runtimes that execute exported models."""
