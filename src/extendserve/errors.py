"""The project's own errors: each one is the user's to fix, and says how."""


class ExtendserveError(Exception):
    """A problem with the user's input or files; the CLI prints it and exits non-zero."""


class BadImageError(ExtendserveError):
    """A photo that cannot be decoded; the service answers 400."""


class HeadFileError(ExtendserveError):
    """A head file that is unsafe, corrupt or does not fit the backbone."""


class BuildError(ExtendserveError):
    """A build that failed; the previous model directory is left untouched."""
