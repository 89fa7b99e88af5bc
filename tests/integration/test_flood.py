"""The default profile's inference port is open to any web page (a no-cors POST needs no preflight, SECURITY.md), so
it must survive what one browser can send: Chromium opens at most 256 connections (its socket pool's limit; 6 per
host name, and DNS-rebound names give a page as many host names as it likes), each carrying the largest body
config.properties admits. With the old 6.5 MB max_request_size, 60 such connections filled java's 384 MiB heap
and java exited; at 1 MiB all of them are answered and java comes out whole."""
from __future__ import annotations

import ast
import re

from benchmarks import flood
from serving.catalog import ROOT

BROWSER_CONNECTIONS = 256


def test_the_default_profile_survives_a_browsers_worth_of_its_largest_bodies(model_store, tmp_path, capsys):
    """256 connections × 3 bodies each of 95% of max_request_size (noise PNGs, all carried to the workers): java
    alive with its pids, every body answered, and 50 ordinary requests per version answered 200 afterwards
    (benchmarks/flood.py)."""
    code = flood.main(["--config", str(ROOT / "config.properties"), "--model-store", str(model_store),
                       "--connections", str(BROWSER_CONNECTIONS), "--requests", str(3 * BROWSER_CONNECTIONS),
                       "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    answers = ast.literal_eval(re.search(r" s: (\{.*\})", out).group(1))
    assert code == 0, out
    # Each body is over the handler's max_bytes, so a worker decodes its header and answers 413; 503/507 are the
    # frontend's refusals when its queue or memory is full. A 500 or a dropped connection fails.
    assert set(answers) <= {"413", "503", "507"}, out
