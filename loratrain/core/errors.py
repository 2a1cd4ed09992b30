"""The errors a user can cause, in a module with no imports, so any layer (and a tool that only needs to catch
them) can use them without loading pydantic, torch or the rest of the package."""

Problem = tuple[str, str]  # (field name or "", what is wrong)


class ConfigError(ValueError):
    """A config value (or an input it names) is wrong; the message says which and what to do.

    `problems` keeps each (field, message) pair, so a form can show every error next to its field.
    """

    def __init__(self, message: str | None = None, problems: list[Problem] | None = None) -> None:
        self.problems: list[Problem] = list(problems or [])
        if message is None:
            message = "\n".join(f"{field}: {text}" if field else text for field, text in self.problems)
        elif not self.problems:
            self.problems = [("", message)]
        super().__init__(message)


class UnsafeFileError(ValueError):
    """A pickled file was given without the user allowing pickle."""
