"""The one exception every dataset problem is reported with."""


class DatasetError(ValueError):
    """A dataset on disk, its ``meta.json`` or a request for it is unusable.

    The message always names the file or folder concerned and says how to fix it.
    """
