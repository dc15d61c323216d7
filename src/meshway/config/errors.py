"""Configuration errors that name the file, the document and the field, like kubectl does.

Validation never stops at the first problem: every check appends a `ConfigIssue`, and the
caller raises one `ConfigError` holding all of them, so that a user fixes a manifest in one pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one place; every part but the message may be unknown."""

    source: str
    document: int | None
    object: str | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.source
        if self.document is not None:
            where = f"{where}: document {self.document}" if where else f"document {self.document}"
        if self.object:
            where = f"{where} ({self.object})" if where else self.object
        return ": ".join(part for part in (where, self.path, self.message) if part)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigError(Exception):
    """Every issue found in one load or apply, so that the caller can report them together."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__(issues)
        self.issues = issues

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)

    def to_json(self) -> list[dict[str, Any]]:
        """Plain data for the admin API and `--output json`."""
        return [issue.to_dict() for issue in self.issues]


class FieldError(ValueError):
    """A validator's complaint about fields below the model that raised it.

    Pydantic only knows the location of the model whose validator failed; each problem's path
    (relative to that model, in YAML field names, "" for the model itself) lets the loader point
    at the exact field. One error can carry several problems so that none is hidden behind another.
    """

    def __init__(self, path: str, message: str, *more: tuple[str, str]) -> None:
        self.problems: list[tuple[str, str]] = [(path, message), *more]
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in self.problems))
