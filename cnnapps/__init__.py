"""cnnapps: a zoo of faithful CNN backbones, one training engine and task plugins for 1D and 2D signals."""
from cnnapps.backbones import create_backbone, list_backbones
from cnnapps.tasks import list_tasks

__all__ = ["create_backbone", "list_backbones", "list_tasks"]
__version__ = "0.1.0"
