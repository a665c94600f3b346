# benchmarks/ is not part of the test suite (tests/); it has its own pytest-benchmark cases.
