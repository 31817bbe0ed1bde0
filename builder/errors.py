"""The builder's own error: one line for the user, raised when a build cannot go on."""


from obelisk.errors import ObeliskError


class BuildError(ObeliskError, RuntimeError):
    pass
