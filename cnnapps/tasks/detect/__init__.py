"""Object detection task: Faster R-CNN / FCOS (and Mask R-CNN instances) over the zoo's backbones with an FPN."""
