"""The error a user can act on (a missing model file, an unreadable shard): reported as one line."""


class CurateError(Exception):
    """A curation input is missing or unusable; the message names the file or key at fault."""
