"""The builder's own error: one line for the user, raised when a build cannot go on."""


class BuildError(RuntimeError):
    pass
