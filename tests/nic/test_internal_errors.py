"""Counting and logging of the bugs the NIC contains."""

from __future__ import annotations

from typing import Any

from twinmesh.nic.internal_errors import LOG_INTERVAL, WHERE, InternalErrors


class Lines:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


def raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_one_line_per_interval_and_a_traceback_once_per_site() -> None:
    log, now = Lines(), [100.0]
    errors = InternalErrors(log, clock=lambda: now[0])
    for _ in range(5):
        errors.record("link_packet", raised(ValueError("bad")))
    assert errors.counts["link_packet"] == 5
    [line] = log.lines
    assert (line["where"], line["error"], line["message"]) == ("link_packet", "ValueError", "bad")
    assert line["exc_info"] is not None and line["held_back"] == 0
    now[0] += LOG_INTERVAL
    errors.record("link_packet", raised(ValueError("bad again")))
    second = log.lines[-1]
    assert second["held_back"] == 4  # the lines not written meanwhile
    assert second["exc_info"] is None  # that site's traceback was logged already
    errors.record("twin_frame", raised(ValueError("elsewhere")))
    assert log.lines[-1]["where"] == "twin_frame" and log.lines[-1]["exc_info"] is not None


def test_metrics_show_every_boundary_from_the_start() -> None:
    errors = InternalErrors(Lines())
    errors.record("twin_frame", raised(KeyError("x")))
    [family] = errors.metrics()
    values = {labels["where"]: value for labels, value in family.samples}
    assert family.name == "twinmesh_internal_errors_total" and family.kind == "counter"
    assert set(values) == set(WHERE)
    assert values["twin_frame"] == 1 and values["link_packet"] == 0
