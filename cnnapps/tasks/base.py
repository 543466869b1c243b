"""The task contract, re-exported for task plugins: it lives in ``cnnapps.engine.task``."""
from cnnapps.engine.task import DataSplits, Task, TaskConfig

__all__ = ["DataSplits", "Task", "TaskConfig"]
