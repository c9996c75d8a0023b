"""Building: heads wired to the base, merged, exported, verified, described (the manifest),
published to a folder and the BentoML store.
"""
