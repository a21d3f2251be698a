"""Silences the messages that building a model with a packaged text tower always prints, and only those.

Building the default model used to print three things that need no action from the user:
transformers' progress bar over the MiniLM weights; its load report listing the checkpoint's
`pooler.dense.*` weights as unused (open_clip's text tower pools the tokens itself and has no
pooler); and open_clip's "initialized partially" warning for a model directory whose image tower
`load_model_dir` loads (and checks) right after. open_clip also logs a failed download before
raising it: said once, by whoever catches the error. Anything else, such as a missing text tower
weight, still gets through.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# The logger transformers' loading report is written to (`log_state_dict_report`'s caller).
TRANSFORMERS_LOAD_LOGGER = "transformers.modeling_utils"


def is_unused_pooler_report(message: str) -> bool:
    """True for a transformers load report whose every row is an UNEXPECTED `pooler.` weight."""
    if "LOAD REPORT" not in message:
        return False
    rows = []
    for line in message.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) >= 2 and cells[1] and cells[0] != "Key" and not set(cells[0]) <= {"-", "+"}:
            rows.append((cells[0], cells[1]))
    return bool(rows) and all(key.startswith("pooler.") and status == "UNEXPECTED" for key, status in rows)


class _DropExpected(logging.Filter):
    def __init__(self, partial_load: bool) -> None:
        super().__init__()
        self.partial_load = partial_load

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.partial_load and message.startswith("Model ") and message.endswith(" initialized partially."):
            return False
        if message.startswith("Failed to download weights for tag"):
            return False  # open_clip raises the same text, which its caller reports (once)
        return not is_unused_pooler_report(message)


@contextlib.contextmanager
def quiet_model_build(partial_load: bool = False) -> Iterator[None]:
    """Within the block, drop the expected messages (see module docstring).

    `partial_load`: the caller loads the remaining weights itself, so open_clip's
    "initialized partially" warning is expected too.
    """
    drop = _DropExpected(partial_load)
    loggers = [logging.getLogger(), logging.getLogger(TRANSFORMERS_LOAD_LOGGER)]
    for target in loggers:
        target.addFilter(drop)
    progress = _transformers_progress_bar(False)
    try:
        yield
    finally:
        _transformers_progress_bar(progress)
        for target in loggers:
            target.removeFilter(drop)


def _transformers_progress_bar(enabled: bool) -> bool:
    """Set transformers' progress bars on or off; returns the previous setting."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # no HF text tower in this environment: nothing to quiet
        return enabled
    previous = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    return previous
