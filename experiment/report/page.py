"""The page skeleton every abloop report shares: CSS, document frame, cards, figure tiles, banner and footer.

The experiment report (`html`) and the weekly report (`weekly_html`) are built from these, so they look alike and
keep the same guarantees: one self-contained file, no JavaScript, nothing fetched, every text escaped (`_e`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from experiment.report.format import _e, _when

_CSS = """
:root{--bg:#f4f5f9;--card:#fff;--ink:#111827;--ink2:#374151;--muted:#6b7280;--line:#e5e7eb;--soft:#f9fafb;
--control:#64748b;--candidate:#7c3aed;--good:#047857;--good-bg:#ecfdf5;--bad:#b91c1c;--bad-bg:#fef2f2;
--warn:#b45309;--warn-bg:#fffbeb;--muted-bg:#f3f4f6}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue","Liberation Sans",Arial,sans-serif}
.wrap{max-width:1180px;margin:0 auto;padding:0 28px}
.topbar{background:#111827;color:#e5e7eb;font-size:13px;padding:9px 0;letter-spacing:.02em}
.topbar b{color:#fff}
.topbar .right{float:right;color:#9ca3af}
header.exp{background:var(--card);border-bottom:1px solid var(--line);padding:22px 0 18px}
header.exp h1{font-size:24px;margin:0 0 4px;font-weight:700}
header.exp .id{font:12px/1.4 "DejaVu Sans Mono","Liberation Mono",Menlo,monospace;color:var(--muted)}
.meta{display:flex;flex-wrap:wrap;gap:6px 22px;margin-top:10px;color:var(--ink2);font-size:13px}
.meta span b{color:var(--muted);font-weight:600;margin-right:4px}
.arms{display:grid;grid-template-columns:1fr 1fr;gap:14px;margin-top:16px}
.arm{border:1px solid var(--line);border-radius:10px;padding:10px 14px;background:var(--soft)}
.arm .name{font-weight:700;font-size:15px;word-break:break-all}
.arm .sub{color:var(--muted);font-size:12px;word-break:break-all}
.tag{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;letter-spacing:.06em;
padding:1px 8px;border-radius:999px;margin-right:8px;vertical-align:1px}
.tag.control{background:#e2e8f0;color:#334155}.tag.candidate{background:#ede9fe;color:#5b21b6}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:700;
text-transform:uppercase;letter-spacing:.05em;vertical-align:middle;white-space:nowrap}
.pill.good{background:var(--good-bg);color:var(--good)}.pill.bad{background:var(--bad-bg);color:var(--bad)}
.pill.warn{background:var(--warn-bg);color:var(--warn)}.pill.muted{background:var(--muted-bg);color:var(--muted)}
.pill.info{background:#eff6ff;color:#1d4ed8}
main{padding:6px 0 30px}
.banner{margin:18px 0 0;padding:12px 16px;border-radius:10px;background:#fff7ed;border:1px solid #fb923c;
color:#7c2d12;font-weight:600}
.banner small{display:block;font-weight:400;color:#9a3412;margin-top:2px}
.note{margin:14px 0 0;padding:9px 14px;border-radius:8px;background:#eff6ff;color:#1e3a8a;font-size:13px}
section.card{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:20px 24px;margin:18px 0;
box-shadow:0 1px 2px rgba(16,24,40,.04)}
section.card>h2{font-size:16px;margin:0 0 4px;font-weight:700}
section.card>.lead{color:var(--muted);font-size:13px;margin:0 0 14px}
.verdict{border-left:8px solid var(--tone)!important}
.verdict.good{--tone:#059669}.verdict.bad{--tone:#dc2626}.verdict.warn{--tone:#d97706}.verdict.muted{--tone:#9ca3af}
.verdict .action{font-size:32px;font-weight:800;color:var(--tone);margin:2px 0 6px;line-height:1.2}
.verdict .action code{font-size:14px;font-weight:600;color:var(--muted);margin-left:10px;
background:var(--muted-bg);padding:2px 8px;border-radius:6px}
.verdict .reason{font-size:15px;color:var(--ink2);max-width:980px}
.figures{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin-top:18px}
.figure{background:var(--soft);border:1px solid var(--line);border-radius:10px;padding:10px 14px}
.figure .k{font-size:12px;color:var(--muted);font-weight:600}
.figure .v{font-size:20px;font-weight:700;font-variant-numeric:tabular-nums}
.figure .s{font-size:12px;color:var(--muted);font-variant-numeric:tabular-nums}
.recorded{margin-top:14px;font-size:13px;color:var(--ink2)}
table{width:100%;border-collapse:collapse;font-size:13px}
th{text-align:left;color:var(--muted);font-weight:600;font-size:11px;text-transform:uppercase;letter-spacing:.04em;
border-bottom:1px solid var(--line);padding:7px 8px;vertical-align:bottom;line-height:1.3}
td{padding:8px 8px;border-bottom:1px solid #f0f1f4;vertical-align:middle}
tr:last-child td{border-bottom:none}
table.compact{width:auto;min-width:620px}
table.compact td:first-child{padding-right:48px}
th .nm{text-transform:none;letter-spacing:0;color:var(--ink2)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.num,td.nowrap{white-space:nowrap}
tr.primary td{background:#faf5ff}
td .sub{display:block;color:var(--muted);font-size:12px}
.reason-cell{color:var(--ink2);max-width:520px}
.legend{display:flex;gap:18px;font-size:13px;color:var(--ink2);margin:0 0 4px}
.legend i{display:inline-block;width:14px;height:4px;border-radius:2px;margin-right:6px;vertical-align:3px}
.legend i.band{height:10px;vertical-align:0;opacity:.35}
.legend i.mark{width:0;height:12px;border-left:2px dashed #0f766e;vertical-align:-1px;border-radius:0}
svg.chart{display:block;margin:2px 0 8px}
svg.chart .plot{fill:#fcfcfd;stroke:#e5e7eb}
svg.chart .grid{stroke:#eceef2;stroke-width:1}
svg.chart .axis{stroke:#9ca3af}
svg.chart .tick{fill:#6b7280;font-size:12px}
svg.chart .axis-label{fill:#6b7280;font-size:12px;font-style:italic}
svg.chart .zero{stroke:#111827;stroke-width:1.5;stroke-dasharray:6 4}
svg.chart .marker{stroke:#0f766e;stroke-width:1.5;stroke-dasharray:4 4}
svg.chart .marker-label{fill:#0f766e;font-size:12px;font-weight:700}
h3{font-size:13px;margin:18px 0 4px;color:var(--ink2)}
.empty{padding:18px;border:1px dashed var(--line);border-radius:10px;color:var(--muted);text-align:center;
background:var(--soft)}
.pair{border:1px solid var(--line);border-radius:10px;margin:12px 0;overflow:hidden}
.pair .q{background:var(--soft);padding:9px 14px;border-bottom:1px solid var(--line);font-weight:600}
.pair .q span{color:var(--muted);font-weight:600;margin-right:6px}
.pair .cols{display:grid;grid-template-columns:1fr 1fr}
.pair .col{padding:10px 14px}
.pair .col+.col{border-left:1px solid var(--line)}
.answer{white-space:pre-wrap;word-break:break-word;font-size:13px;color:var(--ink2);margin:6px 0}
.fb{font-size:12px;color:var(--muted);border-top:1px dashed var(--line);padding-top:6px;margin-top:6px}
.fb .sim{color:#9a3412;font-weight:700}
.kv{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}
ul.notes{margin:6px 0 0;padding-left:18px;color:var(--ink2);font-size:13px}
ul.notes li{margin:3px 0}
footer{color:var(--muted);font-size:12px;padding:0 0 40px}
code{font-family:"DejaVu Sans Mono","Liberation Mono",Menlo,monospace;font-size:12px}
@media print{body{background:#fff}section.card{break-inside:avoid;box-shadow:none}}
"""


def _page(title: str, kind: str, generated_at: str | None, header: str, sections: Iterable[str], footer: str) -> str:
    """One HTML document: inline CSS and SVG, no script, nothing fetched. `kind` names the report in the top bar."""
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>abloop · {_e(title)}</title><style>{_CSS}</style></head><body>",
        f'<div class="topbar"><div class="wrap"><b>abloop</b> · {_e(kind)}'
        f'<span class="right">generated {_e(_when(generated_at))}</span></div></div>',
        header,
        '<main><div class="wrap">', *sections, "</div></main>",
        footer,
        "</body></html>",
    ])


def _card(title: str, lead: str, body: str, extra_class: str = "", anchor: str = "") -> str:
    """A titled section. `lead` and `body` are HTML: the caller has escaped what they carry."""
    anchor_attr = f' id="{_e(anchor)}"' if anchor else ""
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section class="card {extra_class}"{anchor_attr}><h2>{_e(title)}</h2>{lead_html}{body}</section>'


def _tiles(figures: Sequence[tuple[str, str, str]]) -> str:
    """Headline figures as tiles: (label, value, small print) each, all plain text."""
    return '<div class="figures">' + "".join(
        f'<div class="figure"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div><div class="s">{_e(s)}</div>'
        "</div>" for k, v, s in figures) + "</div>"


def _banner(text: str | None) -> str:
    """The simulated-traffic warning (content._simulated_text), or nothing."""
    if not text:
        return ""
    return (f'<div class="banner" role="alert">{_e(text)}<small>Use this report to check the machinery, '
            "not to judge the models.</small></div>")


def _notes_footer(notes: Iterable[str], line: str) -> str:
    """The method notes card and the closing line under the page (both plain text)."""
    items = "".join(f"<li>{_e(note)}</li>" for note in notes)
    return (f'<footer><div class="wrap"><section class="card"><h2>Method notes</h2><ul class="notes">{items}</ul>'
            f"</section>{_e(line)} · a self-contained file: no scripts, nothing fetched.</div></footer>")
