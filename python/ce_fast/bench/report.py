"""The report model: the rows of a bench's results and the columns a backend reads off
them, rendered as a terminal table, Markdown (for benches/RESULTS.md) or JSON.

A :class:`Layout` (one per backend: ``ce_fast.bench.cpu.LAYOUT``,
``ce_fast.bench.cuda.LAYOUT``) supplies the columns, the one-line machine summary,
the footnotes and the machine keys Markdown lists; :class:`Report` lays results out
with it and renders them. Nothing here depends on the device.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .config import format_size

READ, COPY, OP, NOT_RUN = "read", "copy", "op", "not run"


@dataclass(frozen=True)
class Row:
    """One table line: a yardstick (``kind`` ``"read"`` / ``"copy"``), an op of a case
    (``"op"``, ``name`` the op) or a case that did not run (``"not run"``)."""

    case: dict
    kind: str
    name: str
    record: dict  # the yardstick's timing, or the op's record ({} for a case not run)
    first: bool  # the first line of its case (it carries size and dtype)

    @property
    def timing(self) -> dict | None:
        """The timing this line reports: the yardstick's, or ce_fast's for an op."""
        if self.kind == OP:
            return self.record.get("ce_fast")
        return self.record

    @property
    def yardsticks(self) -> dict:
        """The case's yardstick timings (``"read"``, ``"copy"``)."""
        return self.case.get("yardsticks", {})


@dataclass(frozen=True)
class Column:
    """A table column: its title, how a row's cell reads, and its alignment."""

    title: str
    cell: Callable[[Row], str]
    align: str = "right"  # "right" for numbers, "left" for text


def _size(row: Row) -> str:
    return format_size(row.case["shape"]) if row.first else ""


def _dtype(row: Row) -> str:
    return row.case["dtype"] if row.first else ""


def _name(row: Row) -> str:
    return row.name


LEAD_COLUMNS: tuple[Column, ...] = (
    Column("size", _size, "left"),
    Column("dtype", _dtype, "left"),
    Column("op", _name, "left"),
)


class Layout:
    """How one backend's results read: the columns after size / dtype / op, the names
    of the yardstick lines, the machine summary and the footnotes. Subclasses set
    :attr:`columns` and :attr:`markdown_keys` and implement :meth:`machine_line` and
    :meth:`notes`."""

    columns: Sequence[Column] = ()
    yardstick_names: Mapping[str, str] = MappingProxyType({READ: "read pass", COPY: "copy"})
    markdown_keys: Sequence[str] = ()

    def all_columns(self) -> list[Column]:
        """Size, dtype and op, then this backend's columns."""
        return [*LEAD_COLUMNS, *self.columns]

    def rows(self, results: dict) -> list[Row]:
        """The table lines of ``results``: per case its yardsticks, then its ops."""
        out: list[Row] = []
        for case in results["cases"]:
            lines: list[tuple[str, str, dict]] = []
            if case.get("error"):
                lines.append((NOT_RUN, "(not run)", {}))
            else:
                ys = case.get("yardsticks", {})
                lines += [(k, self.yardstick_names[k], ys[k]) for k in (READ, COPY) if k in ys]
                lines += [(OP, op, rec) for op, rec in case["ops"].items()]
            out += [Row(case, kind, name, rec, i == 0) for i, (kind, name, rec) in enumerate(lines)]
        return out

    def machine_line(self, results: dict) -> str:
        """One line saying what the results were measured on."""
        raise NotImplementedError

    def notes(self, results: dict) -> list[str]:
        """This backend's footnotes (what the columns mean)."""
        raise NotImplementedError

    def footnotes(self, results: dict) -> list[str]:
        """:meth:`notes`, then every case's own notes."""
        out = list(self.notes(results))
        for c in results["cases"]:
            out += [f"{format_size(c['shape'])} {c['dtype']}: {n}" for n in c["notes"]]
        return out


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*")


def _md_value(key: str, value: Any) -> Any:
    return f"{value / 2**30:.1f} GiB" if key in ("memory_bytes", "gpu_memory_bytes") else value


@dataclass
class Report:
    """Results laid out as a table: machine summary, command, header and cells, notes."""

    machine_line: str
    machine: list[tuple[str, Any]]  # (key, value) pairs for Markdown's machine list
    command: str
    columns: list[Column]
    cells: list[list[str]]
    notes: list[str]

    @classmethod
    def of(cls, results: dict, layout: Layout) -> Report:
        """``results`` (as :func:`ce_fast.bench.run_bench` returns them) laid out by ``layout``."""
        columns = layout.all_columns()
        m = results["machine"]
        return cls(
            machine_line=layout.machine_line(results),
            machine=[(k, m[k]) for k in layout.markdown_keys if k in m and m[k] is not None],
            command=results.get("command", ""),
            columns=columns,
            cells=[[col.cell(row) for col in columns] for row in layout.rows(results)],
            notes=layout.footnotes(results),
        )

    @property
    def head(self) -> list[str]:
        """The column titles."""
        return [c.title for c in self.columns]

    def text(self) -> str:
        """The terminal table: machine line, command, aligned columns, footnotes."""
        head = self.head
        widths = [max([len(head[i])] + [len(r[i]) for r in self.cells]) for i in range(len(head))]
        right = [c.align == "right" for c in self.columns]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

        out = [self.machine_line, self.command, "", line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in self.cells]
        out.append("")
        out += ["  " + n for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        """The report as Markdown (for benches/RESULTS.md)."""
        md = ["# ce_fast benchmark results", "", "## Machine", ""]
        md += [f"- **{k}**: {_md_value(k, v)}" for k, v in self.machine]
        md += ["", "## Command", "", "```", self.command, "```", "", "## Results", ""]
        md.append("| " + " | ".join(self.head) + " |")
        md.append("|" + "|".join("---:" if c.align == "right" else "---" for c in self.columns) + "|")
        md += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in self.cells]
        md += ["", "## Notes", ""]
        md += [f"- {_md_escape(n)}" for n in self.notes]
        md.append("")
        return "\n".join(md)


def format_json(results: dict) -> str:
    """The results themselves as JSON text (what ``--json`` writes)."""
    return json.dumps(results, indent=1)


def op_cell(fmt: Callable[[dict], str]) -> Callable[[Row], str]:
    """A cell that only op lines fill: ``fmt`` of the op's record."""

    def cell(row: Row) -> str:
        return fmt(row.record) if row.kind == OP else ""

    return cell
