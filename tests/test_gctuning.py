"""Both serving programs raise the young-generation GC threshold at start."""

from __future__ import annotations

import gc

import chatmaild.cli
from chatmail_common.gctuning import SERVING_GC_THRESHOLD


def test_metadata_entry_point_raises_only_the_young_gc_threshold(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(chatmaild.cli, "configure_logging", lambda level: None)
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, before[1], before[2])
        # A missing chatmail.ini ends main early, after the process-wide settings.
        assert chatmaild.cli.main([str(tmp_path / "s"), str(tmp_path / "missing.ini")]) == 1
        assert gc.get_threshold() == (SERVING_GC_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)
    assert "chatmail-metadata: error:" in capsys.readouterr().err
