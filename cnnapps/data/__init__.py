"""Data helpers shared by every task: where data and caches live, and atomic cache writes."""
from .root import cache_dir, find_data_root, require_path

__all__ = ["cache_dir", "find_data_root", "require_path"]
