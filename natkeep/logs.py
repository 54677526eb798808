"""
Log lines as JSON: one object per line, for journald, Loki or jq.

twistd chooses its log observer before it builds the service, so the JSON
format is twistd's C{--logger} option naming L{jsonLogger};
C{natkeep run --log-format json} (or C{log_format = json} in its config
file) passes it, and C{twistd natkeep} refuses a JSON log format it was
not started with.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Optional

from twisted.logger import FileLogObserver, LogEvent, formatEvent

#: twistd's option value that selects the JSON observer.
JSON_LOGGER = "natkeep.logs.jsonLogger"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def eventAsLine(event: LogEvent) -> Optional[str]:
    """
    One log event as one line of JSON: C{time} (ISO 8601, UTC), C{level},
    C{namespace}, C{message} (the formatted text), C{failure} (a traceback,
    when there is one), and the event's own fields.
    """
    record: dict[str, Any] = {}
    when = event.get("log_time")
    if when is not None:
        record["time"] = datetime.fromtimestamp(when, timezone.utc).isoformat(
            timespec="milliseconds"
        )
    level = event.get("log_level")
    record["level"] = getattr(level, "name", "info")
    record["namespace"] = event.get("log_namespace", "")
    record["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["failure"] = failure.getTraceback()
        except Exception:
            record["failure"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message"):
            continue
        record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False) + "\n"


def jsonLogger(outFile: Optional[IO[Any]] = None) -> FileLogObserver:
    """
    A log observer writing one JSON object per line to C{outFile} (standard
    output by default, where systemd's journal or a container runtime
    collects it).  twistd calls it with no argument.
    """
    return FileLogObserver(outFile if outFile is not None else sys.stdout, eventAsLine)
