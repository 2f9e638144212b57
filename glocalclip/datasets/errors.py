"""The one exception every dataset problem is reported with."""

import re

# The last line of a formatted traceback that ends in a DatasetError: "<module path>.DatasetError: <message>"
_RAISED_LINE = re.compile(r"^(?:[\w.]+\.)?DatasetError: ", re.MULTILINE)
_WORKER_PREFIX = "Caught DatasetError in DataLoader worker"


class DatasetError(ValueError):
    """A dataset on disk, its ``meta.json`` or a request for it is unusable.

    The message always names the file or folder concerned and says how to fix it. A DataLoader
    worker's DatasetError reaches the main process rebuilt from "Caught DatasetError in DataLoader
    worker ... Original Traceback ..."; the message is then the worker's own (the traceback is kept
    in ``worker_traceback``), so the user reads one line, as without workers.
    """

    def __init__(self, message: str = ""):
        message = str(message)
        self.worker_traceback = None
        if message.startswith(_WORKER_PREFIX):
            raised = list(_RAISED_LINE.finditer(message))
            if raised:
                self.worker_traceback = message
                message = message[raised[-1].end():].strip()
        super().__init__(message)
