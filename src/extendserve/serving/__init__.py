"""Serving: a built model run by onnxruntime (or OpenVINO), batched, with the service's settings
and the served-model resolution. No torch.
"""
