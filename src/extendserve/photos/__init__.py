"""Photos -> the model's uint8 pixels: decoding, orientation, the served crop. No torch.
"""
