"""Clients of the HTTP service: :mod:`client.remote` is what ``vpdsr upscale --server`` uses.

Standard library only (urllib); imports ``model`` (its batch, error and image types), never ``service``.
"""
