"""Human preference collection: `prefcli label` in a terminal (terminal.py) and `prefcli label serve`, a web
app for a team of raters (docs/labelling.md).

- items.py: the items of a labelling task (pairs, ratings, rankings; gold items), read and checked;
- store.py: the task's SQLite store (schema, invites and sessions, assignment with overlap, answers, undo);
- stats.py: agreement, gold accuracy, position bias and timing as pure functions of the answers;
- exchange.py: `prefcli label export` (the JSONL shapes training reads) and `import` (terminal files);
- web.py: the HTTP layer (Starlette), thin over the store; serve.py starts it.

Only terminal.py and items.py are imported by the terminal tool; the web stack (Starlette, uvicorn,
krippendorff: `pip install 'prefcli[label]'`) is imported only by `prefcli label serve` and `stats`.
"""
