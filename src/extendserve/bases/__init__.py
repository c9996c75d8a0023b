"""The base classifier: the registry of built-in backbones (architecture, weights, preprocessing,
labels), untrusted checkpoints, ONNX files as bases, and the base's world (its background).
"""
