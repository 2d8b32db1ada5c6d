"""The speed benchmarks' optional peers (bench/peers.py): a peer whose package is missing is
skipped with a one-line note, Lightning is found under either of its names, and --peers takes
only known names. Nothing here needs TensorFlow, Keras or Lightning: their imports are made to
fail, or answered by a stand-in module."""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # load_peers sets it; restored afterwards
    return importlib.import_module("peers")


def hide(monkeypatch, *modules: str) -> None:
    """Make `import module` fail for each module and its parent packages."""
    for module in modules:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]), None)


def test_a_peer_whose_package_is_missing_is_skipped_with_a_note(peers, monkeypatch):
    hide(monkeypatch, *(m for modules in peers.PEERS.values() for m in modules))
    loaded, notes = peers.load_peers(list(peers.PEERS))
    assert loaded == {}
    assert [note.split(":")[0] for note in notes] == [f"skipping {name}" for name in peers.PEERS]
    for note in notes:
        assert "\n" not in note and "bench/requirements-peers.txt" in note


def test_lightning_is_found_under_its_older_name(peers, monkeypatch):
    hide(monkeypatch, "lightning.pytorch")
    stand_in = types.ModuleType("pytorch_lightning")
    stand_in.__version__ = "2.6.0"
    monkeypatch.setitem(sys.modules, "pytorch_lightning", stand_in)
    loaded, notes = peers.load_peers(["lightning"])
    assert loaded == {"lightning": stand_in} and notes == []
    assert peers.versions(loaded) == "pytorch_lightning 2.6.0"


def test_peers_flag_takes_known_names_all_or_none(peers, capsys):
    parser = argparse.ArgumentParser()
    peers.peers_flag(parser, ("tf", "keras"))
    assert parser.parse_args([]).peers == ["tf", "keras"]
    assert parser.parse_args(["--peers", "all"]).peers == ["tf", "keras"]
    assert parser.parse_args(["--peers", "keras"]).peers == ["keras"]
    assert parser.parse_args(["--peers", "none"]).peers == []
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--peers", "tf,lightning"])
    assert exit_.value.code == 2
    assert "unknown peer 'lightning': choose from tf, keras" in capsys.readouterr().err
