"""Every tiny variant's GGUF and TensorRT-LLM files are byte-identical to the sha256 values recorded
in tests/fixtures/export_sha256.json before the family registry (issue 15) existed: describing
families as data changed no file pizoo writes. See tests/export_identity.py for what is hashed.
Re-recorded once since: the TensorRT-LLM config.json of each scaled model, which gained the `pizoo`
key naming its base by public identity (issue 21); every GGUF and rank file is unchanged."""

from __future__ import annotations

import json

from export_identity import FIXTURE, compute


def test_exports_are_byte_identical_to_the_recorded_hashes(tmp_path):
    recorded = json.loads(FIXTURE.read_text())
    now = compute(tmp_path)
    assert set(now) == set(recorded)
    changed = sorted(k for k in recorded if now[k] != recorded[k])
    assert not changed, f"{len(changed)} of {len(recorded)} files changed, e.g. {changed[:5]}"
