"""Error types: user mistakes get one clear line; everything else is a bug or a runtime failure."""


class UserInputError(ValueError):
    """Bad input from the user (file, name, value); the message names the problem and what is accepted."""
