"""Multi-label image classification: VOC-mini or a folder with a labels CSV; mAP and F1 at tuned thresholds."""
