"""How `prefcli explain` shows its scores: coloured tokens on a terminal and a self-contained HTML page."""

from __future__ import annotations

import html as _html

from .inputs import Explained

# ------------------------------------------------------------------------------------ render


def display_token(t: str) -> str:
    return t.replace("\n", "⏎").replace("\t", "⇥")


def _colour(s: float | None, scale: float) -> tuple[int, int, int, float] | None:
    if s is None or scale <= 0:
        return None
    a = min(1.0, abs(s) / scale)
    return (40, 160, 60, 0.1 + 0.75 * a) if s >= 0 else (210, 40, 40, 0.1 + 0.75 * a)


def colour_scale(es: list[Explained]) -> float:
    vals = [abs(s) for e in es for s in e.scores if s is not None]
    return max(vals) if vals else 0.0


def terminal_text(e: Explained, scale: float):
    from rich.text import Text

    out = Text()
    for i, (t, s) in enumerate(zip(e.tokens, e.scores)):
        c = _colour(s, scale)
        style = "dim" if i < e.prompt_len else ""
        if c is not None:
            r, g, b, a = c
            # blend with white by the alpha: rich has no transparency
            rgb = tuple(int(255 - a * (255 - x)) for x in (r, g, b))
            style = f"{style} black on rgb({rgb[0]},{rgb[1]},{rgb[2]})".strip()
        out.append(display_token(t), style=style or None)
    return out


def html_tokens(e: Explained, scale: float, shared: set[int] | None = None) -> str:
    spans = []
    for i, (t, s) in enumerate(zip(e.tokens, e.scores)):
        c = _colour(s, scale)
        cls = ["tok"]
        if i < e.prompt_len:
            cls.append("prompt")
        if shared is not None and i not in shared:
            cls.append("diff")
        style = f' style="background: rgba({c[0]},{c[1]},{c[2]},{c[3]:.3f})"' if c else ""
        score = "" if s is None else f"{s:.6g}"
        title = f"{t!r}: {score or 'not scored'}" + (
            " (to the margin: the score negated)" if e.flipped and score else ""
        )
        spans.append(
            f'<span class="{" ".join(cls)}" data-score="{score}" title="{_html.escape(title)}"{style}>'
            f"{_html.escape(t)}</span>"
        )
    return "".join(spans)


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1000px;
       color: #222; line-height: 1.5; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin: 1.6em 0 0.4em; border-bottom: 1px solid #ddd; }
h3 { font-size: 0.95em; margin: 0.8em 0 0.3em; color: #444; }
.meta { color: #666; font-size: 0.9em; }
.tokens { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 15px; white-space: pre-wrap;
          word-break: break-word; background: #fafafa; border: 1px solid #e4e4e4; padding: 0.6em; border-radius: 4px; }
.tok { border-radius: 2px; }
.tok.prompt { color: #888; }
.tok.diff { box-shadow: inset 0 -2px 0 #333; }
.legend span { display: inline-block; padding: 0 0.5em; margin-right: 0.4em; border-radius: 2px; }
table.top { border-collapse: collapse; font-size: 0.85em; margin-top: 0.4em; }
table.top td, table.top th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
"""


def render_html(summary: dict, blocks: list[tuple[dict, list[tuple[str, Explained, set[int] | None]]]]) -> str:
    """A self-contained page (inline CSS, no script, no external asset)."""
    head = summary
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>prefcli explain</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>prefcli explain</h1>",
        f'<p class="meta">model <code>{_html.escape(head["model"])}</code> ({head["model_kind"]}), method '
        f"<b>{head['method']}</b>: {_html.escape(head['what'])}</p>",
        '<p class="legend"><span style="background: rgba(40,160,60,0.7)">raises the score (a pair: favours chosen)'
        '</span><span style="background: rgba(210,40,40,0.7)">lowers it (a pair: favours rejected)</span>'
        '<span style="color:#888">grey: prompt</span>'
        '<span style="box-shadow: inset 0 -2px 0 #333">underlined: differs between chosen and rejected</span>'
        " Hover over a token for its value.</p>",
    ]
    for info, sides in blocks:
        parts.append(f"<h2>{_html.escape(info['title'])}</h2>")
        scale = colour_scale([e for _, e, _ in sides])
        for side, e, shared in sides:
            parts.append(f"<h3>{_html.escape(side)}: {_html.escape(e.info.get('headline', ''))}</h3>")
            if e.flipped:
                parts.append(
                    '<p class="meta">The token scores of this answer are sign-flipped: each is its contribution to '
                    "the margin chosen &minus; rejected, i.e. the token's own score negated (a token that raises the "
                    "rejected answer's score counts against the margin, in red).</p>"
                )
            parts.append(f'<p class="tokens">{html_tokens(e, scale, shared)}</p>')
            ranked = sorted(((s, t) for t, s in zip(e.tokens, e.scores) if s is not None), key=lambda x: -abs(x[0]))
            if ranked:
                rows = "".join(
                    f"<tr><td><code>{_html.escape(repr(t))}</code></td><td>{s:+.4f}</td></tr>" for s, t in ranked[:5]
                )
                head = "to the margin (&minus;score)" if e.flipped else "score"
                parts.append(f'<table class="top"><tr><th>token</th><th>{head}</th></tr>{rows}</table>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
