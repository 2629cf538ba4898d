"""The operator's web console under /ui/ (docs/ui.md).

Server-rendered pages (Jinja2 templates in templates/) and one hand-written script
(static/console.js) that follows the server's pushed updates (server-sent events from
feed.py) and draws the storm chart as SVG; nothing is fetched from elsewhere.
"""

from .backend import Backend
from .pages import UI_KEY, ConsoleState, add_routes

__all__ = ["UI_KEY", "Backend", "ConsoleState", "add_routes"]
