"""bench/peers.py: the comparison table (medians, ranges, peer/provision ratios) and the --peers choice."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import peers  # noqa: E402


def test_table_gives_medians_ranges_and_ratios():
    provision = {"fresh": [10.0, 12.0, 11.0], "noop": [1.0, 1.0, 2.0]}
    measured = {"versions": {"pyinfra": "3.10.0"},
                "tools": {"provision": {"noop_10": [2.0]},
                          "pyinfra": {"fresh": [22.0, 20.0, 30.0], "noop": [3.0], "noop_10": [5.0]}}}
    lines = peers.table(provision, measured, (10,)).splitlines()
    row = {line[:17].strip(): line[17:].split() for line in lines[1:-1]}
    assert row["fresh"] == ["11.00", "(10.00-12.00)", "22.00", "(20.00-30.00)", "2.0x"]
    assert row["no-op"] == ["1.00", "(1.00-2.00)", "3.00", "(3.00-3.00)", "3.0x"]
    assert row["no-op, 10 hosts"] == ["2.00", "(2.00-2.00)", "5.00", "(5.00-5.00)", "2.5x"]
    assert row["one-line change"] == ["-", "-", "-"]  # measured by neither
    assert "pyinfra 3.10.0" in lines[-1]


def test_table_without_provision_figures_has_no_ratio():
    measured = {"versions": {}, "tools": {"ansible": {"fresh": [30.0]}}}
    fresh = peers.table({}, measured, ()).splitlines()[1]
    assert fresh.split()[1:] == ["-", "30.00", "(30.00-30.00)", "-"]


def test_selected_peers():
    assert peers.selected("none") == []
    assert peers.selected("ansible,pyinfra") == ["ansible", "pyinfra"]
    with pytest.raises(SystemExit, match="unknown peer chef"):
        peers.selected("pyinfra,chef")
