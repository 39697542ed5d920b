"""The default test suite's time, folder by folder: the figures of docs/testing.md.

    python benchmarks/record.py --name tests -- python benchmarks/test_times.py

runs `python -m pytest` once with a JUnit report, prints pytest's own summary, then a table of
each folder under tests/ with its tests (skipped among them) and the seconds its tests took.
"""
from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={report}"], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
        cases = list(ET.parse(report).iter("testcase")) if report.exists() else []
    tests, skipped, seconds = collections.Counter(), collections.Counter(), collections.Counter()
    for case in cases:
        parts = case.get("classname", "").split(".")
        folder = parts[1] if len(parts) > 2 else "tests"
        tests[folder] += 1
        skipped[folder] += case.find("skipped") is not None
        seconds[folder] += float(case.get("time", 0))
    print(f"\n{'folder':<12}{'tests':>7}{'skipped':>9}{'seconds':>9}")
    for folder in sorted(tests):
        print(f"{folder:<12}{tests[folder]:>7}{skipped[folder]:>9}{seconds[folder]:>9.0f}")
    print(f"{'all':<12}{sum(tests.values()):>7}{sum(skipped.values()):>9}{sum(seconds.values()):>9.0f}"
          f"   (wall {wall:.0f} s)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
