pytest_plugins = ["tests.s3_server", "tests.pipeline_fixture"]
