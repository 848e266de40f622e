"""Errors a user can cause on the export side. The CLI prints their message as one line."""


class SdexportError(Exception):
    """Base class: the message is complete and meant for the user."""


class SourceError(SdexportError):
    """The model source cannot be read (missing, not a diffusers folder, unknown layout)."""


class ExportError(SdexportError):
    """A conversion failed or produced a model that does not match torch."""


class OptionError(SdexportError):
    """A command-line option or profile value is invalid."""
