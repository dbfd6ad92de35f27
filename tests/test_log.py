"""configure_logging / get_logger: formats, levels, idempotence, errors."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime

import pytest
import structlog

from twinmesh.errors import ConfigError
from twinmesh.log import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_one_object_per_line_with_bound_keys() -> None:
    buf = io.StringIO()
    configure_logging("json", file=buf)
    log = get_logger(component="link")
    log.info("link_up", peer="abc", rtt_ms=3)
    log.bind(link=7).warning("link_slow")

    first, second = json_lines(buf)
    assert first["event"] == "link_up"
    assert first["level"] == "info"
    assert first["component"] == "link"
    assert first["peer"] == "abc"
    assert first["rtt_ms"] == 3
    assert isinstance(first["timestamp"], str)
    assert datetime.fromisoformat(first["timestamp"]).utcoffset() is not None
    assert second["event"] == "link_slow"
    assert second["level"] == "warning"
    assert second["link"] == 7
    assert second["component"] == "link"


def test_json_exception_stays_on_one_line() -> None:
    buf = io.StringIO()
    configure_logging("json", file=buf)
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger().exception("it_failed", peer="p")
    (record,) = json_lines(buf)
    assert record["event"] == "it_failed"
    assert record["level"] == "error"
    assert "ValueError: boom" in str(record["exception"])


def test_json_includes_context_variables() -> None:
    buf = io.StringIO()
    configure_logging("json", file=buf)
    structlog.contextvars.bind_contextvars(request_id="r1")
    get_logger().info("handled")
    (record,) = json_lines(buf)
    assert record["request_id"] == "r1"


def test_level_filtering() -> None:
    buf = io.StringIO()
    configure_logging("json", "WARNING", file=buf)
    log = get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [r["event"] for r in json_lines(buf)] == ["w", "e"]

    buf = io.StringIO()
    configure_logging("json", "debug", file=buf)
    get_logger().debug("d")
    assert [r["event"] for r in json_lines(buf)] == ["d"]


def test_console_is_human_readable_without_colours_off_a_tty() -> None:
    buf = io.StringIO()
    configure_logging("console", file=buf)
    get_logger(component="nic").info("link_up", peer="abc")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    line = lines[0]
    assert "\x1b[" not in line
    assert "[info" in line
    assert "link_up" in line
    assert "peer=abc" in line
    assert "component=nic" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_console_uses_colours_on_a_tty() -> None:
    buf = FakeTty()
    configure_logging("console", file=buf)
    get_logger().info("hello")
    assert "\x1b[" in buf.getvalue()


def test_auto_means_console() -> None:
    buf = io.StringIO()
    configure_logging("auto", file=buf)
    get_logger().info("hello", peer="abc")
    assert "peer=abc" in buf.getvalue()
    configure_logging(file=buf)  # the default is auto as well
    get_logger().info("again")
    assert "again" in buf.getvalue().splitlines()[-1]


def test_default_file_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    get_logger(component="x").info("to_stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    (record,) = [json.loads(line) for line in captured.err.splitlines()]
    assert record["event"] == "to_stderr"
    assert record["component"] == "x"


def test_configuring_twice_is_idempotent() -> None:
    buf = io.StringIO()
    configure_logging("json", file=buf)
    configure_logging("json", file=buf)
    get_logger().info("once")
    assert len(buf.getvalue().splitlines()) == 1

    other = io.StringIO()
    configure_logging("json", file=other)  # a second call replaces the first output
    get_logger().info("elsewhere")
    assert len(buf.getvalue().splitlines()) == 1
    assert [r["event"] for r in json_lines(other)] == ["elsewhere"]


def test_logger_taken_before_configuring_follows_the_configuration() -> None:
    early = get_logger(component="early")  # as a module does at import time
    buf = io.StringIO()
    configure_logging("json", file=buf)
    early.info("late_event")
    (record,) = json_lines(buf)
    assert record["component"] == "early"


@pytest.mark.parametrize(
    ("fmt", "level", "needle"),
    [("xml", "info", "'xml'"), ("json", "loud", "'loud'"), ("", "info", "format")],
)
def test_bad_format_or_level_is_a_one_line_config_error(fmt: str, level: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        configure_logging(fmt, level, file=io.StringIO())
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
