"""Semantic segmentation: FCN / U-Net decoders on any 2D backbone, on Penn-Fudan or a folder of masks (instance
masks are the detect task's Mask R-CNN)."""
