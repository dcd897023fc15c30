"""`report.html`: one self-contained page per run (wat-train, wat-probe, wat-eval, wat-robust).

The page must open anywhere, offline, years later, and travel as one file (mail, a paper's
supplement): figures are embedded as base64 PNG data URIs, CSS is inline, nothing is fetched, and
the only script is a few lines of plain JavaScript that sort a table when its header is clicked.
Every piece of text that comes from a run (paths, class names, options) is HTML-escaped.

A page is a title plus sections; a section is a heading plus HTML fragments made by the
functions here (`headline`, `key_values`, `table`, `figure`, `paragraph`).
"""
from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#fafafa}
main{max-width:1040px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:12px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#555;margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}
.card .v{font-size:20px;font-weight:600}.card .k{color:#555;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f0f0f0}table.sortable th{cursor:pointer}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
.scroll{max-height:480px;overflow:auto;display:inline-block;max-width:100%}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top;background:#fff;border:1px solid #ddd;padding:6px}
figure img{display:block;max-width:100%;height:auto}
figcaption{color:#444;font-size:12px;max-width:480px;margin-top:4px}
code{font-size:12px}
"""

# click a header: sort by that column (numbers numerically via data-v, empty cells last)
_JS = """
document.querySelectorAll("table.sortable").forEach(function(t){
  t.querySelectorAll("th").forEach(function(th,i){th.addEventListener("click",function(){
    var dir=th.dataset.dir==="asc"?"desc":"asc";
    t.querySelectorAll("th").forEach(function(h){delete h.dataset.dir});th.dataset.dir=dir;
    var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;
      if(x===undefined||y===undefined){x=a.cells[i].textContent;y=b.cells[i].textContent;
        if(x===""||y==="")return (x==="")-(y==="");return dir==="asc"?x.localeCompare(y):y.localeCompare(x);}
      return dir==="asc"?x-y:y-x;});
    rows.forEach(function(r){body.appendChild(r)});});});});
"""


class ReportError(ValueError):
    """A report asked to embed something that is not what it should be (e.g. not a PNG)."""


@dataclass
class Section:
    title: str      # the section heading (escaped when written)
    body: str       # HTML made by the functions below (already escaped)


def esc(v) -> str:
    return html.escape(str(v), quote=True)


def fmt(v, digits: int = 4) -> str:
    """Readable text of a value: floats to `digits` significant digits, None/NaN as empty."""
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else f"{float(v):.{digits}g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    return str(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(float(v))


def headline(items) -> str:
    """The few numbers a reader wants first, as cards: [(label, value), ...]."""
    cards = "".join(f'<div class="card"><div class="v">{esc(fmt(v))}</div><div class="k">{esc(k)}</div></div>'
                    for k, v in items)
    return f'<div class="cards">{cards}</div>'


def key_values(d: dict) -> str:
    """A two-column table of names and values (run options, cache metadata)."""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v, 6))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def table(header, rows, *, sortable: bool = True, digits: int = 4) -> str:
    """A data table; numeric cells are right-aligned and sort numerically."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = "".join(f'<td class="n" data-v="{float(v)!r}">{esc(fmt(v, digits))}</td>' if _is_number(v)
                        else f"<td>{esc(fmt(v, digits))}</td>" for v in r)
        body.append(f"<tr>{cells}</tr>")
    cls = ' class="sortable"' if sortable else ""
    return (f'<div class="scroll"><table{cls}><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def figure(png, caption: str = "", width_px: int | None = None) -> str:
    """A PNG (path or bytes) embedded as a data URI, with a caption. Shown at its 300-dpi size
    scaled to ~100 dpi (so a 3.3 in figure is ~330 px wide) unless `width_px` is given."""
    data = Path(png).read_bytes() if isinstance(png, (str, os.PathLike)) else bytes(png)
    if not data.startswith(PNG_MAGIC):
        raise ReportError(f"not a PNG: {png if isinstance(png, (str, os.PathLike)) else 'bytes'}")
    w = width_px or max(200, round(_png_width(data) / 3 * 1.25))
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(caption)}" width="{w}">{cap}</figure>'


def _png_width(data: bytes) -> int:
    return int.from_bytes(data[16:20], "big")   # IHDR: width is the first field after the chunk header


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def page(title: str, subtitle: str, sections) -> str:
    parts = [f"<h1>{esc(title)}</h1>", f'<p class="sub">{esc(subtitle)}</p>']
    parts += [f"<section><h2>{esc(s.title)}</h2>{s.body}</section>" for s in sections if s.body]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
            + "\n".join(parts) + f"\n</main><script>{_JS}</script></body></html>\n")


def write_report(path, title: str, subtitle: str, sections) -> Path:
    """Write the page atomically (a reader never sees half a report) and return its path."""
    path = Path(path)
    atomic_write(path, page(title, subtitle, sections))
    return path


def cache_metadata(meta, n_clips: int | None = None, path=None) -> dict:
    """What a reader needs to know about a cache, from its own metadata."""
    # pad30 windows of schema <= 3 caches were sample-padded, unlike transcription's (schema 4): say which
    policy = f"{meta.policy} ({meta.pad30_padding}-padded)" if meta.pad30_padding else meta.policy
    d = {"encoder": getattr(meta, "encoder", "whisper"), "model": meta.model, "input policy": policy, "pooling": meta.pooling, "dataset": meta.dataset,
         "classes": len(meta.vocab), "labels": "multi-label" if meta.multilabel else "single-label",
         "layers x frames x width": f"{meta.n_layers} x {meta.n_frames} x {meta.dim}",
         "clip seconds": meta.clip_seconds, "weights fingerprint": meta.fingerprint[:16]}
    if n_clips is not None:
        d["clips"] = n_clips
    if path is not None:
        d["file"] = str(path)
    if meta.versions:
        d["versions"] = ", ".join(f"{k} {v}" for k, v in sorted(meta.versions.items()))
    return d
