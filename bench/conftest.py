"""Keep the benchmarks out of ordinary test runs: bench/ is collected only with
``--benchmark-only`` (``pytest bench/ --benchmark-only``)."""


def pytest_ignore_collect(collection_path, config):
    return not config.getoption("benchmark_only", default=False)
