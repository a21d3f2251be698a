"""The serving process's lifecycle flag: set when a graceful SIGTERM starts draining.

`/readyz` reads it to turn 503 while the server still answers. It is process-wide rather than
app state because a worker of `clipsearch serve --workers N` builds its app from an import string
inside uvicorn, where the signal handler (`app.serve`) cannot reach that app's state.
"""

from __future__ import annotations

import threading

draining = threading.Event()
