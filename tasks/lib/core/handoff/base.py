"""What every hand-off model is: a `Record` (a typed row, frozen, unknown keys ignored)
and a `Handoff` (a file: `read`, `parse`, `write`); `problem`, pydantic's complaint as a
phrase; `csv_rows` and `csv_text`, how the CSV files among them are read and written."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from tlflow.tasks.lib.core.errors import handoff_error
from tlflow.tasks.lib.core.files import write_json


class Record(BaseModel):
    """A typed record inside a hand-off file: frozen, unknown keys ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Handoff(Record):
    """A JSON file one stage (`STAGE`) writes and others read."""

    STAGE: ClassVar[str]

    @classmethod
    def read(cls, path: Path) -> Self:
        """The file at `path`. Raises TlflowError naming it and STAGE when it is missing or
        malformed."""
        if not path.is_file():
            raise handoff_error(path, cls.STAGE)
        return cls.parse(path.read_bytes(), path)

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> Self:
        """The model from the file's text (e.g. as committed at a git revision); `path` names
        it in the error."""
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise handoff_error(path, cls.STAGE, f"not valid JSON ({err})") from None
        try:
            return cls.model_validate(obj)
        except ValidationError as err:
            raise handoff_error(path, cls.STAGE, problem(err)) from None

    def as_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return self.model_dump(mode="json", by_alias=True)

    def write(self, path: Path) -> None:
        """Write the file atomically, keys sorted (the same model gives the same bytes)."""
        write_json(path, self.as_json())


def problem(err: ValidationError) -> str:
    """pydantic's first complaint as a phrase: where in the file, and what."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "the file"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg'].lower()}{more}"


def csv_rows(text: str | bytes) -> list[dict[str, str]]:
    """A CSV file's rows (its text, or its bytes as UTF-8), each a dict by the header's
    names (csv.DictReader)."""
    return list(csv.DictReader(io.StringIO(text.decode("utf-8") if isinstance(text, bytes)
                                           else text)))


def csv_text(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """The CSV text of a header and its rows, "\n" line ends (csv.writer)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


class CsvHandoff(Handoff):
    """A CSV file one stage writes and another reads: `from_rows` builds the model from its
    rows (dicts by the header's names); a file that does not make one is one line, "not
    <WHAT> (why)", naming it and STAGE."""

    WHAT: ClassVar[str]  # what the file is, as the error says it: "a coverage table"

    @classmethod
    def from_rows(cls, rows: list[dict[str, str]]) -> Self:
        raise NotImplementedError

    @classmethod
    def parse(cls, text: str | bytes, path: Path) -> Self:
        try:
            return cls.from_rows(csv_rows(text))
        except (KeyError, ValueError, TypeError) as err:  # UnicodeDecodeError, pydantic's too
            raise handoff_error(path, cls.STAGE, f"not {cls.WHAT} ({err})") from None
