"""The light modules that `--help` reads (interpret/choices.py, interop/choices.py) agree with the
stage modules that run the commands: one definition each, and the defaults shown are the ones used."""

from __future__ import annotations

import dataclasses

from routesae.interop import choices as interop_choices
from routesae.interop import export, importer
from routesae.interpret import choices, contexts, diff, run_interpret, steering
from routesae.interpret.steer_cli import SteerConfig


def test_stage_modules_use_the_one_definition():
    assert contexts.RULES is choices.RULES and contexts.PAPER_THRESHOLD is choices.PAPER_THRESHOLD
    assert run_interpret.PROTOCOLS is choices.PROTOCOLS
    assert diff.REDUCTIONS is choices.REDUCTIONS
    assert steering.MODES is choices.MODES and steering.WHERES is choices.WHERES
    assert steering.POSITIONS is choices.POSITIONS
    assert export.FORMATS is interop_choices.EXPORT_FORMATS
    assert importer.FORMATS is interop_choices.IMPORT_FORMATS


def test_import_offers_exactly_the_formats_it_reads():
    # --format's choices come from choices.py; a reader added or dropped must show there too, in order
    assert tuple(importer.READERS) == interop_choices.IMPORT_FORMATS


def test_contexts_help_shows_the_config_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(contexts.ContextsConfig)}
    assert {k: fields[k] for k in choices.CONTEXTS_DEFAULTS} == choices.CONTEXTS_DEFAULTS
    assert fields["threshold"] == choices.PAPER_THRESHOLD
    assert run_interpret.InterpretConfig.protocols == choices.PROTOCOLS


def test_steer_config_defaults_to_the_generation_settings():
    cfg = SteerConfig(sae="s", edits=[steering.Edit(3)], prompts=["p"])
    assert cfg.settings == steering.GenerationSettings()
