"""The `make sim` scenarios, run small: every phase measures something sensible."""

from __future__ import annotations

from pathlib import Path

from twinmesh.sim import scenarios
from twinmesh.sim.__main__ import BEGIN, END, markdown, terminal, write_section
from twinmesh.sim.scenarios import Scenario


def test_a_small_scenario_measures_every_figure(tmp_path: Path) -> None:
    lines: list[str] = []
    scenario = Scenario("ring", 12, None, steady=30.0, detections=(0.0, 0.5))
    result = scenarios.run(scenario, lines.append)
    assert result.missing_routes == 0
    assert 0 < result.converged < 1.0
    assert result.routes_mean == result.routes_max == 11
    assert result.bytes_per_min_mean > 0
    assert result.violations == 0
    assert len(result.repairs) == 2
    instant, keepalive = result.repairs
    # A ring always has the other way round.
    assert instant.repaired is not None and instant.repaired < 1.0
    assert keepalive.repaired is not None and 0.5 <= keepalive.repaired < 1.5
    assert keepalive.traffic is not None and keepalive.traffic >= 0.5
    assert len(lines) == 5  # set-up, convergence, steady state, two repairs
    # The report: a table on the terminal, a section of a markdown file.
    assert "12" in terminal([result])
    doc = tmp_path / "SCALING.md"
    doc.write_text(f"# Title\n\nhand-written\n\n{BEGIN}\nold figures\n{END}\n\nmore text\n")
    write_section(doc, markdown([result], "python -m twinmesh.sim", 1.0))
    text = doc.read_text()
    assert text.startswith("# Title\n\nhand-written\n") and text.endswith(f"{END}\n\nmore text\n")
    assert "old figures" not in text and "| 12 | ring | all |" in text


def test_relay_scenarios_pick_their_origins_by_seed() -> None:
    scenario = Scenario("scale-free", 40, 5, steady=20.0, detections=(0.0,))
    result = scenarios.run(scenario, lambda line: None)
    assert result.destinations == 5
    assert result.routes_max == 5  # the origins only: relays are no destinations
    assert result.missing_routes == 0
    assert result.relay_refusals > 0
