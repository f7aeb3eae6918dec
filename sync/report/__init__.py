"""The HTML run report (``cepsync report``): summary (pure), charts (pygal SVG), html (Jinja2)."""
