"""The one exception type users see."""


class AntidoteError(Exception):
    """A problem with the user's input: the message names the problem and the fix, on one line.

    The CLI turns it into that line on stderr and exit code 2; nothing is written.
    """


def validation_message(exc) -> str:
    """One line from a pydantic ValidationError: the first problem, where it is, and what was given."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "config"
    given = first.get("input")
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    # a misspelled key shows as a missing one and an unknown one: name the unknown one too
    unknown = [".".join(map(str, e.get("loc", ()))) for e in errors[1:] if e["type"] == "extra_forbidden"]
    named = f"; unknown key {', '.join(unknown)} (misspelled?)" if unknown and first["type"] != "extra_forbidden" else ""
    rest = len(errors) - 1 - len(unknown if named else [])
    more = f"; {rest} more problem(s)" if rest else ""
    return f"{where}: {first['msg']}{shown}{named}{more}"


def validated(model_cls, values: dict):
    """Build a pydantic model, turning a ValidationError into the one-line AntidoteError every command prints."""
    from pydantic import ValidationError

    try:
        return model_cls(**values)
    except ValidationError as exc:
        raise AntidoteError(f"{model_cls.__name__}: {validation_message(exc)}") from None
