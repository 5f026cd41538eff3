"""The one exception type users see."""


class AntidoteError(Exception):
    """A problem with the user's input: the message names the problem and the fix, on one line.

    The CLI turns it into that line on stderr and exit code 2; nothing is written.
    """


def validation_message(exc) -> str:
    """One line from a pydantic ValidationError: the first problem, where it is, and what was given."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "config"
    given = first.get("input")
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    more = f"; {len(exc.errors()) - 1} more problem(s)" if len(exc.errors()) > 1 else ""
    return f"{where}: {first['msg']}{shown}{more}"


def validated(model_cls, values: dict):
    """Build a pydantic model, turning a ValidationError into the one-line AntidoteError every command prints."""
    from pydantic import ValidationError

    try:
        return model_cls(**values)
    except ValidationError as exc:
        raise AntidoteError(f"{model_cls.__name__}: {validation_message(exc)}") from None
