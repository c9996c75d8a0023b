"""Heads: head files, each method's fit and scoring (the calibrated head, the gate), and the checks
of what a head will do (strangers, suspicious photos).
"""
