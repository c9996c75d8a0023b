"""Training: photos -> cached features -> a head (train-head), and the fine-tuned top.
"""
