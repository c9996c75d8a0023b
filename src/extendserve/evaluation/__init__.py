"""Evaluation: what an extension did on labelled photos, and its HTML report. No torch.
"""
