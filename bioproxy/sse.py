"""Server-sent events as llama-server writes them: `data: <JSON>` lines, events apart."""

import json


def objects(event):
    """The JSON objects on an event's data lines (others left out: [DONE], not JSON)."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            data = json.loads(line[5:])
        except ValueError:
            continue
        if isinstance(data, dict):
            yield data
