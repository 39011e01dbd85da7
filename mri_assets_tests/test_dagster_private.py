"""Dagster's private API, all in `mri_assets.definitions.dagster_private`: still there in the installed Dagster.

A Dagster upgrade that moves or changes one of the names fails here with a sentence naming it
and who needs it, before `mri-assets run` (runs re-executable from the UI), the Celery path or
the sensors meet it."""

from __future__ import annotations

import importlib

import pytest

from mri_assets.definitions import dagster_private


def test_every_private_name_used_is_in_the_installed_dagster_with_the_keywords_passed():
    problems = dagster_private.private_api_problems()
    assert problems == [], "\n".join(problems)


def test_a_moved_name_and_a_changed_signature_are_reported_in_words(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dagster_private, "USED", (
        ("dagster._core.origin", "NoSuchOrigin", (), "location_runs"),
        ("dagster._core.execution.api", "execute_run", ("no_such_keyword",), "location_runs"),
        ("dagster._core.no_such_module", "Anything", (), "workers"),
    ))
    problems = dagster_private.private_api_problems()
    assert len(problems) == 3
    assert "dagster._core.origin.NoSuchOrigin is gone" in problems[0]
    assert "no longer takes ['no_such_keyword']" in problems[1]
    assert "dagster._core.no_such_module.Anything is gone" in problems[2]
    assert all("dagster-io/dagster#19458" in problem for problem in problems)


def test_the_module_exports_what_its_users_import():
    module = importlib.import_module("mri_assets.definitions.dagster_private")
    for name in module.__all__:
        assert hasattr(module, name), name
