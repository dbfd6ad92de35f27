"""`twinctl` twin commands: arguments, rendering, exit codes, --json, and end to end.

End-to-end tests drive real twins (`twin_mesh`: real NICs over memnet, real Twin objects)
that serve their real control sockets. Most run twinctl's `main` in a worker thread with
its own stdout/stderr (in-process, so fast); the `process` tests run the real console
script where a signal matters (Ctrl-C ends `ping` and `inbox --follow`).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from twinmesh.cli import twin as commands
from twinmesh.cli.twinctl import main
from twinmesh.errors import ApiError
from twinmesh.identity.keys import Identity
from twinmesh.testing.processes import console_script, run_pnicd, run_twind
from twinmesh.testing.processes import twinctl as twinctl_process
from twinmesh.testing.twins import TwinMesh, twin_mesh
from twinmesh.twin.control import serve_control
from twinmesh.twin.service import CONTROL_SOCKET, WEB_URL_FILE, Twin

TIMEOUT = 30
STRANGER = Identity.generate().public.text  # a valid id no twin holds


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


async def twinctl(*argv: str | os.PathLike[str]) -> Ran:
    """twinctl in-process (a worker thread runs its own trio loop)."""
    out, err = io.StringIO(), io.StringIO()
    run = partial(main, [os.fspath(a) for a in argv], stdout=out, stderr=err)
    code = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    return Ran(code, out.getvalue(), err.getvalue())


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


@asynccontextmanager
async def controlled(tmp_path: Path, nics: int = 2) -> AsyncIterator[TwinMesh]:
    """A twin mesh whose twins serve their control socket in their state dir."""
    async with twin_mesh(tmp_path, nics=nics) as mesh:
        for twin in mesh.twins:
            await mesh.nursery.start(serve_control, twin, twin.state_dir / CONTROL_SOCKET)
        yield mesh


def at(twin: Twin) -> list[str]:
    return ["--twin", str(twin.state_dir)]


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("argv", [
    ["ping", "abc"],
    ["find", "x" * 52],
    ["send", STRANGER[:-1] + "!", "hi"],
    ["contacts", "add", "not-a-twin"],
    ["inbox", "--with", "nope"],
])
def test_a_malformed_twin_id_is_a_usage_error_naming_it(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    err = usage_error(capsys, *argv)
    assert "is not a twin id" in err
    assert err.strip().splitlines()[-1].startswith(f"twinctl {argv[0]}")


@pytest.mark.parametrize(("argv", "complaint"), [
    (["ping", STRANGER, "-c", "0"], "0 is not in [1, 1e+06]"),
    (["ping", STRANGER, "-W", "0"], "0 is not in (0, 60]"),
    (["ping", STRANGER, "-i", "soon"], "'soon' is not a number"),
    (["send", STRANGER, "hi", "--ttl", "5000"], "5000 is not in [1, 1800]"),
    (["inbox", "-n", "0"], "0 is not in [1, 10000]"),
    (["inbox", "--since", "yesterday"], "'yesterday' is not a time"),
    (["inbox", "--since", "-5"], "'-5' is not a time after 1970"),
    (["settings", "--contacts-only", "maybe"], "expected on or off"),
    (["send", STRANGER, " "], "an empty message"),
    (["contacts"], "required: COMMAND"),
    (["move"], "NIC_PATH"),
])
def test_out_of_range_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], complaint: str
) -> None:
    assert complaint in usage_error(capsys, *argv)


def test_a_twin_id_is_taken_in_any_case_and_sent_canonical() -> None:
    assert commands.twin_id(STRANGER.upper()) == STRANGER
    assert commands.twin_id(f"  {STRANGER} ") == STRANGER


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_twin_that_is_not_running_is_one_line_and_exit_1(
    tmp_path: Path, json_flag: list[str]
) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--twin", str(tmp_path), "status", *json_flag], stdout=out, stderr=err)
    assert code == 1
    expected = f"twin not running at {tmp_path / CONTROL_SOCKET} (is twind running?)"
    assert err.getvalue() == f"twinctl: {expected}\n"
    if json_flag:
        assert json.loads(out.getvalue()) == {"error": expected, "code": "notRunning"}
    else:
        assert out.getvalue() == ""


def test_the_default_twin_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TWINMESH_TWIN", raising=False)
    err = io.StringIO()
    assert main(["id"], stdout=io.StringIO(), stderr=err) == 1
    assert str(tmp_path / "xdg" / "twinmesh" / "twin" / CONTROL_SOCKET) in err.getvalue()
    monkeypatch.setenv("TWINMESH_TWIN", str(tmp_path / "elsewhere.sock"))
    err = io.StringIO()
    assert main(["id"], stdout=io.StringIO(), stderr=err) == 1
    assert f"at {tmp_path / 'elsewhere.sock'} " in err.getvalue()


# ------------------------------------------------------------------ rendering


def entry(**fields: Any) -> dict[str, Any]:
    return {"id": "ab" * 16, "peer": STRANGER, "peerName": "", "outgoing": True,
            "text": "hi", "at": 0.0, "status": "queued", "code": "", **fields}


def test_chat_lines_show_direction_peer_status_and_one_line_text() -> None:
    line = commands.render_entry(entry(text="two\nlines", peerName="bob"))
    assert line.endswith(f"→ bob ({STRANGER[:16]}…) [queued]  two ⏎ lines")
    incoming = commands.render_entry(entry(outgoing=False, status="received"))
    assert f"← {STRANGER[:16]}…  hi" in incoming and "received" not in incoming


def test_events_render_as_one_readable_line_each() -> None:
    assert commands.render_event({"messageStatus": {"id": "ab" * 16, "status": "expired",
                                                    "code": "noRoute"}}) == (
        f"message {'ab' * 8} is expired (noRoute)")
    contact = {"twin": STRANGER, "name": "bob", "state": "pending", "since": 0.0}
    assert commands.render_event({"contact": contact}) == (
        f"contact bob ({STRANGER[:16]}…): pending")
    lost = commands.render_event({"connection": {"twin": STRANGER, "name": "", "nic": "",
                                                 "nicSocket": ""}})
    assert lost.startswith("lost the NIC")
    assert commands.render_event({"message": entry()}) == commands.render_entry(entry())


def test_status_of_a_twin_without_a_nic_says_messages_queue() -> None:
    info = {"twin": STRANGER, "name": "", "connected": False, "nic": "", "nicSocket": "",
            "uptime": 75.0, "waiting": 2, "unread": 0, "contacts": 1, "version": "0.1.0"}
    fields = dict(line.split(None, 1) for line in commands.render_status(info).splitlines())
    assert fields["nic"].startswith("not attached")
    assert fields["waiting"] == "2 message(s) queued for the NIC"
    assert (fields["name"], fields["uptime"]) == ("-", "75.0s")


def test_the_ping_summary_reads_like_ping8() -> None:
    summary = {"sent": 4, "received": 3, "loss": 0.25, "min": 0.001, "avg": 0.002,
               "max": 0.003, "p99": 0.003}
    assert commands.render_ping_summary("abc…", summary) == (
        "--- abc… ping statistics ---\n"
        "4 sent, 3 received, 25% loss\n"
        "rtt min/avg/max/p99 = 1.000/2.000/3.000/3.000 ms")
    nothing = {"sent": 2, "received": 0, "loss": 1.0}
    assert commands.render_ping_summary("abc…", nothing).endswith("2 sent, 0 received, 100% loss")


# ------------------------------------------------------------------ end to end


async def test_id_and_status_describe_the_twin(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice = mesh.twins[0]
        with trio.fail_after(TIMEOUT):
            ran_id = await twinctl(*at(alice), "id")
            ran_json = await twinctl("id", "--json", "--twin", alice.state_dir / CONTROL_SOCKET)
            ran_status = await twinctl(*at(alice), "status")
    assert (ran_id.code, ran_id.out) == (0, alice.key.text + "\n")
    assert ran_json.json["twin"] == alice.key.text
    assert ran_json.json["nic"] == mesh.nics[0].key.text
    fields = dict(line.split(None, 1) for line in ran_status.lines)
    assert fields["twin"] == alice.key.text
    assert fields["nic"].startswith(f"{mesh.nics[0].key.text} (connected via ")
    assert fields["waiting"].startswith("0 ")


async def test_ping_prints_a_line_per_reply_and_statistics(tmp_path: Path) -> None:
    async with controlled(tmp_path, nics=3) as mesh:
        alice, carol = mesh.twins[0], mesh.twins[2]
        with trio.fail_after(TIMEOUT):
            ran = await twinctl(*at(alice), "ping", carol.key.text, "-c", "3", "-i", "0.01")
            as_json = await twinctl(*at(alice), "--json", "ping", carol.key.text, "-c", "2",
                                    "-i", "0.01")
    assert ran.code == 0, ran.err
    assert ran.lines[0] == f"PING {carol.key.text}"
    replies = sorted(line for line in ran.lines if line.startswith("reply from"))
    assert [line.split()[3] for line in replies] == ["seq=1", "seq=2", "seq=3"]
    assert all(line.endswith(" ms") for line in replies)
    assert "3 sent, 3 received, 0% loss" in ran.out
    assert "rtt min/avg/max/p99 = " in ran.out
    assert as_json.code == 0
    assert (as_json.json["sent"], as_json.json["received"], as_json.json["loss"]) == (2, 2, 0)
    assert [r["seq"] for r in as_json.json["replies"]] == [1, 2]
    assert all(r["rtt"] > 0 for r in as_json.json["replies"])


async def test_ping_nobody_answers_is_full_loss_and_exit_1(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        with trio.fail_after(TIMEOUT):
            ran = await twinctl(*at(mesh.twins[0]), "ping", STRANGER, "-c", "2", "-i", "0.01",
                                "-W", "0.5")
    assert ran.code == 1
    assert len([line for line in ran.lines if line.startswith("no reply: seq=")]) == 2
    assert "2 sent, 0 received, 100% loss" in ran.out
    assert "rtt" not in ran.out


async def test_find_prints_identity_nic_hops_and_lookup_time(tmp_path: Path) -> None:
    async with controlled(tmp_path, nics=3) as mesh:
        alice, carol = mesh.twins[0], mesh.twins[2]
        with trio.fail_after(TIMEOUT):
            # twin_mesh settles routes, not DHT records: wait until carol's is stored.
            while True:
                try:
                    await alice.find(carol.key.text)
                    break
                except ApiError:
                    await trio.sleep(0.05)
            ran = await twinctl(*at(alice), "find", carol.key.text)
            unknown = await twinctl(*at(alice), "find", STRANGER)
    assert ran.code == 0, ran.err
    fields = dict(line.split(None, 1) for line in ran.lines)
    assert fields["twin"] == carol.key.text
    assert fields["nic"] == mesh.nics[2].key.text
    assert int(fields["hops"]) == 2
    assert fields["lookup"].endswith(" ms")
    assert "rounds" in fields
    assert unknown.code == 1
    assert unknown.err.startswith("twinctl: ") and len(unknown.err.splitlines()) == 1
    assert STRANGER in unknown.err


async def test_send_wait_then_inbox_on_both_sides(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice, bob = mesh.twins
        with trio.fail_after(TIMEOUT):
            sent = await twinctl(*at(alice), "send", bob.key.text, "hello bob", "--wait")
            await twinctl(*at(alice), "send", bob.key.text, "second", "--wait")
            bob_inbox = await twinctl(*at(bob), "inbox")
            last = await twinctl(*at(bob), "inbox", "--with", alice.key.text, "-n", "1",
                                 "--json")
            nobody = await twinctl(*at(bob), "inbox", "--with", STRANGER)
            everything = await twinctl(*at(bob), "inbox", "--json")
            second_at = everything.json[1]["at"]
            since = await twinctl(*at(bob), "inbox", "--since", repr(second_at), "--json")
            # ISO 8601 has microseconds: halfway between the two is safe from rounding.
            between = (everything.json[0]["at"] + second_at) / 2
            since_iso = await twinctl(
                *at(bob), "inbox", "--since",
                datetime.datetime.fromtimestamp(between).isoformat(), "--json")
    assert sent.code == 0, sent.err
    assert sent.out.startswith("delivered: message ")
    assert [line.split("  ", 2)[2] for line in bob_inbox.lines] == ["hello bob", "second"]
    assert all(f"← {alice.key.text[:16]}…" in line for line in bob_inbox.lines)
    assert [m["text"] for m in last.json] == ["second"]
    assert nobody.out == "no messages\n"
    # From the second message's time on: it alone (unix seconds or local ISO 8601).
    assert [m["text"] for m in since.json] == ["second"]
    assert [m["text"] for m in since_iso.json] == ["second"]


async def test_send_to_a_twin_that_never_answers_ends_in_exit_1_with_wait(
    tmp_path: Path
) -> None:
    async with controlled(tmp_path) as mesh:
        with trio.fail_after(TIMEOUT):
            ran = await twinctl(*at(mesh.twins[0]), "--json", "send", STRANGER, "lost",
                                "--ttl", "1", "--wait")
    assert ran.code == 1
    assert json.loads(ran.out)["code"] in ("expired", "failed")
    assert "was not delivered" in ran.err and len(ran.err.splitlines()) == 1


async def test_contact_request_accept_list_and_remove(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice, bob = mesh.twins
        with trio.fail_after(TIMEOUT):
            asked = await twinctl(*at(alice), "contacts", "add", bob.key.text, "--name", "bob")
            assert asked.out.startswith("requested: asked bob (")
            while not (pending := (await twinctl(*at(bob), "contacts", "list", "--json")).json):
                await trio.sleep(0.02)
            assert (pending[0]["twin"], pending[0]["state"]) == (alice.key.text, "pending")
            accepted = await twinctl(*at(bob), "contacts", "accept", alice.key.text,
                                     "--name", "alice")
            assert accepted.out == f"accepted: alice ({alice.key.text[:16]}…) is a contact\n"
            while True:
                table = await twinctl(*at(alice), "contacts", "list")
                if "accepted" in table.out:
                    break
                await trio.sleep(0.02)
            header, row = table.lines
            assert header.split() == ["TWIN", "NAME", "STATE", "SINCE"]
            assert row.split()[:3] == [bob.key.text, "bob", "accepted"]
            removed = await twinctl(*at(alice), "contacts", "remove", bob.key.text)
            again = await twinctl(*at(alice), "contacts", "remove", bob.key.text)
            empty = await twinctl(*at(alice), "contacts", "list")
    assert removed.code == 0 and removed.out == f"removed {bob.key.text}\n"
    assert again.code == 1 and "is not a contact" in again.err
    assert empty.out == "no contacts\n"


async def test_settings_change_one_field_and_keep_the_other(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice = mesh.twins[0]
        with trio.fail_after(TIMEOUT):
            await twinctl(*at(alice), "settings", "--name", "Alice")
            on = await twinctl(*at(alice), "settings", "--contacts-only", "on", "--json")
            shown = await twinctl(*at(alice), "settings")
    assert on.json == {"contactsOnly": True, "name": "Alice"}
    assert dict(line.rsplit(None, 1) for line in shown.lines) == {
        "contacts only": "on", "name": "Alice"}


async def test_web_prints_the_page_url_or_says_there_is_none(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice = mesh.twins[0]
        with trio.fail_after(TIMEOUT):
            none = await twinctl(*at(alice), "web")
            url = "http://127.0.0.1:8080/?token=abc"
            (alice.state_dir / WEB_URL_FILE).write_text(url + "\n")
            shown = await twinctl("--twin", alice.state_dir / CONTROL_SOCKET, "web")
            as_json = await twinctl(*at(alice), "web", "--json")
    assert none.code == 1 and "serves no web page" in none.err and "--http" in none.err
    assert (shown.code, shown.out) == (0, url + "\n")
    assert as_json.json == {"url": url}


async def test_move_attaches_the_twin_to_another_nic(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice = mesh.twins[0]
        with trio.fail_after(TIMEOUT):
            moved = await twinctl(*at(alice), "move", mesh.nics[1].state_dir)
            status = await twinctl(*at(alice), "status", "--json")
            nowhere = await twinctl(*at(alice), "move", tmp_path / "no-such-nic")
    assert moved.code == 0, moved.err
    assert moved.out.startswith(f"moved: attached to NIC {mesh.nics[1].key.text}")
    assert status.json["nic"] == mesh.nics[1].key.text
    assert nowhere.code == 1 and "no NIC at" in nowhere.err


async def test_follow_ends_with_exit_1_when_the_twin_goes_away(tmp_path: Path) -> None:
    async with twin_mesh(tmp_path) as mesh:
        alice, bob = mesh.twins
        await alice.send_text(bob.key.text, "history", wait=True)
        out, err = io.StringIO(), io.StringIO()
        argv = ["--twin", str(bob.state_dir), "inbox", "--follow", "--json"]
        codes: list[int] = []

        async def follow() -> None:
            run = partial(main, argv, stdout=out, stderr=err)
            codes.append(await trio.to_thread.run_sync(run, abandon_on_cancel=True))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as client, trio.open_nursery() as server:
                await server.start(serve_control, bob, bob.state_dir / CONTROL_SOCKET)
                client.start_soon(follow)
                while "history" not in out.getvalue():
                    await trio.sleep(0.01)
                await alice.send_text(bob.key.text, "live")
                while '"live"' not in out.getvalue():
                    await trio.sleep(0.01)
                server.cancel_scope.cancel()  # twind stops serving: connections close
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    texts = [line["message"]["text"] for line in lines if "message" in line]
    assert texts == ["history", "live"]  # JSON lines shaped like events
    assert codes == [1]
    assert err.getvalue().startswith("twinctl: the twin at ")
    assert "closed the connection" in err.getvalue() and len(err.getvalue().splitlines()) == 1


# ------------------------------------------------------------------ real processes


async def start_twinctl(*argv: str | os.PathLike[str]) -> trio.Process:
    return await trio.lowlevel.open_process(
        [*console_script("twinctl"), *map(os.fspath, argv)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Lines:
    def __init__(self, process: trio.Process) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.buffer = b""
        self.seen: list[str] = []

    async def until(self, predicate: Any) -> str:
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                self.seen.append(line.decode())
                if predicate(self.seen[-1]):
                    return self.seen[-1]
            data = await self.stream.receive_some()
            if not data:
                raise AssertionError(f"twinctl ended; it printed {self.seen}")
            self.buffer += data


async def finish(process: trio.Process) -> tuple[int, str]:
    assert process.stdout is not None and process.stderr is not None
    rest = b""
    while chunk := await process.stdout.receive_some():
        rest += chunk
    err = b""
    while chunk := await process.stderr.receive_some():
        err += chunk
    return await process.wait(), rest.decode() + err.decode()


@pytest.mark.process
async def test_against_a_real_twind_id_status_and_web(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with (run_pnicd(tmp_path / "nic", health=False) as nic,
                    run_twind(tmp_path / "twin", nic.state_dir,
                              args=["--http", "127.0.0.1:0"]) as twind):
            ran_id = await twinctl_process("--twin", twind.state_dir, "id")
            status = await twinctl_process("--twin", twind.state_dir, "status", "--json")
            web_url = await twinctl_process("--twin", twind.state_dir, "web")
        stopped = await twinctl_process("--twin", tmp_path / "twin", "status")
    assert (ran_id.returncode, ran_id.stdout) == (0, twind.key + "\n")
    assert json.loads(status.stdout)["nic"] == nic.key
    assert web_url.returncode == 0, web_url.stderr
    assert web_url.stdout.startswith("http://127.0.0.1:") and "token=" in web_url.stdout
    assert stopped.returncode == 1
    assert stopped.stderr == (f"twinctl: twin not running at "
                              f"{tmp_path / 'twin' / CONTROL_SOCKET} (is twind running?)\n")


@pytest.mark.process
async def test_inbox_follow_prints_history_then_live_messages_until_ctrl_c(
    tmp_path: Path
) -> None:
    async with controlled(tmp_path) as mesh:
        alice, bob = mesh.twins
        with trio.fail_after(TIMEOUT):
            await alice.send_text(bob.key.text, "before", wait=True)
            process = await start_twinctl(*at(bob), "inbox", "--follow")
            try:
                lines = Lines(process)
                assert (await lines.until(lambda s: "before" in s)).endswith("  before")
                await alice.send_text(bob.key.text, "while following")
                live = await lines.until(lambda s: "while following" in s)
                assert f"← {alice.key.text[:16]}…" in live
                process.send_signal(signal.SIGINT)
                code, rest = await finish(process)
            finally:
                process.kill()
    assert code == 0, rest
    assert "Traceback" not in rest


@pytest.mark.process
async def test_ping_without_count_runs_until_ctrl_c_then_summarises(tmp_path: Path) -> None:
    async with controlled(tmp_path) as mesh:
        alice, bob = mesh.twins
        with trio.fail_after(TIMEOUT):
            process = await start_twinctl(*at(alice), "ping", bob.key.text, "-i", "0.05")
            try:
                lines = Lines(process)
                await lines.until(lambda s: "seq=2 " in s)
                process.send_signal(signal.SIGINT)
                code, rest = await finish(process)
            finally:
                process.kill()
    assert code == 0, rest
    assert "ping statistics" in rest and "rtt min/avg/max/p99" in rest
    assert "Traceback" not in rest
