"""The committed stubs are exactly what grpcio-tools generates from the .proto."""

from protos.generate import ROOT, generate


def test_committed_stubs_match_the_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run python -m protos.generate"
