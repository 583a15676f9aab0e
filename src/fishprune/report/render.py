"""Tables as text: Markdown, LaTeX (booktabs) and long-format CSV rows."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from fishprune.report.tables import LayerTable, Table, fmt_sparsity, show


def markdown(table: Table) -> str:
    lines = [f"### {table.title()}", "", table.caption(), "",
             "| sparsity | " + " | ".join(table.methods) + " |",
             "|---|" + "---|" * len(table.methods)]
    for s in table.sparsities:
        cells = []
        for m, mark in zip(table.methods, table.marks(s)):
            text = table.text(table.cells.get((s, m)))
            cells.append(f"**{text}**" if mark == "best" else f"<u>{text}</u>"
                         if mark == "within" else text)
        lines.append(f"| {fmt_sparsity(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text).replace("·", "$\\cdot$")


def latex(table: Table) -> str:
    head = " & ".join(["Sparsity", *(tex_escape(m) for m in table.methods)])
    lines = ["\\begin{table}[t]", "\\centering",
             f"\\caption{{{tex_escape(table.title())}. {tex_escape(table.caption())}}}",
             f"\\begin{{tabular}}{{l{'c' * len(table.methods)}}}", "\\toprule",
             head + " \\\\", "\\midrule"]
    for s in table.sparsities:
        cells = [fmt_sparsity(s)]
        for m, mark in zip(table.methods, table.marks(s)):
            text = table.text(table.cells.get((s, m))).replace("±", "$\\pm$")
            cells.append(f"\\textbf{{{text}}}" if mark == "best" else f"\\underline{{{text}}}"
                         if mark == "within" else text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines).replace("±", "$\\pm$") + "\n"


def layer_markdown(lt: LayerTable) -> str:
    lines = [f"#### Per-layer density (%) at sparsity {lt.sparsity:g}: {lt.table.title()}", "",
             "Mean over seeds; † the layer kept no weight in at least one seed.", "",
             "| layer | " + " | ".join(lt.methods) + " |", "|---|" + "---|" * len(lt.methods)]
    lines += [f"| {lay} | " + " | ".join(lt.cell(lay, m) for m in lt.methods) + " |"
              for lay in lt.layers]
    return "\n".join(lines) + "\n"


def layer_latex(lt: LayerTable) -> str:
    lines = ["\\begin{table}[t]", "\\centering",
             f"\\caption{{Per-layer density (\\%) at sparsity {lt.sparsity:g}: "
             f"{tex_escape(lt.table.title())}. Mean over seeds; \\dag{{}} collapsed.}}",
             f"\\begin{{tabular}}{{l{'r' * len(lt.methods)}}}", "\\toprule",
             " & ".join(["Layer", *map(tex_escape, lt.methods)]) + " \\\\", "\\midrule"]
    lines += [" & ".join([tex_escape(lay), *(lt.cell(lay, m).replace("†", "\\dag{}")
                                             for m in lt.methods)]) + " \\\\"
              for lay in lt.layers]
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}", "\\end{table}"]) + "\n"


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: show(v) if isinstance(v, (list, tuple)) else v
                         for k, v in row.items()})
    return buf.getvalue()


def summary_rows(tables: list[Table], layer_tables: list[LayerTable]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Long-format rows: one per (table, method, sparsity) and one per (…, layer)."""
    summary, per_layer = [], []
    for t in tables:
        for (s, m), c in sorted(t.cells.items()):
            summary.append({**t.settings, "method": m, "sparsity": s, "metric": t.metric,
                            "n": c.n, "mean": c.mean, "std": c.std})
        for note, c in t.dense:
            summary.append({**t.settings, "method": "dense" + note, "sparsity": 0.0,
                            "metric": t.metric, "n": c.n, "mean": c.mean, "std": c.std})
    for lt in layer_tables:
        for (lay, m), d in lt.density.items():
            per_layer.append({**lt.table.settings, "method": m, "sparsity": lt.sparsity,
                              "layer": lay, "density": d, "collapsed": (lay, m) in lt.collapsed})
    return summary, per_layer
