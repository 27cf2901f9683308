"""Tiny real backbones for tests and the CPU overlays (``configs/tiny_*.yaml``), one module each.

Sizes follow diffusers' own pipeline tests; every model is built in code, nothing is downloaded.
"""
