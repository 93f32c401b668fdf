import pytest

pytest_plugins = ["tests.s3_server", "tests.pipeline_fixture"]


@pytest.fixture
def store(tmp_path):
    """A file store in the test's own folder (modules with a store of their own override it)."""
    from ddft.store import Store

    return Store(str(tmp_path))
