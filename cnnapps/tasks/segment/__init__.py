"""Segmentation: semantic (FCN / U-Net decoders on any 2D backbone) and instance modes, on Penn-Fudan."""
