"""`tritium generate` end to end on the embedded model: the streamed text is the engine's greedy completion and
the closing line reports speed, the weights' share of the copy bandwidth and what the load added to memory."""
import re

import pytest

from tritium.cli import generate as cli


@pytest.mark.parametrize("weights", ["native", "float"])
def test_generate_streams_and_reports(weights, capsys):
    assert cli.main(["Name a color.", "--max-new-tokens", "4", "--weights", weights, "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    err = " ".join(err.split())   # rich wraps the closing line to the console's width off a terminal
    assert out.strip()                                    # the completion, streamed to stdout
    assert f"weights: {'float' if weights == 'float' else 'q4/32+mins q8/32'}" in err
    # (the figure the load added can be negative here: this test process may have freed more than it loads)
    m = re.search(r"resident after load (\d+) MiB \(the load added (-?\d+)\)", err)
    assert m and int(m.group(2)) <= int(m.group(1))
    assert re.search(r"decode [\d.]+ tok/s \(\d+ tokens\)", err)
