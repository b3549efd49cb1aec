"""Calibration: int8 (Q/DQ) stage networks from a folder of real images, with measured quality."""
