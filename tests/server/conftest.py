"""A real tritonserver per test: free ports, readiness wait, the log shown on failure, always stopped."""

import os

import pytest

from moec.errors import ServerError
from moec.server import TritonServer, find_install


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="session")
def server_install():
    try:
        return find_install()
    except ServerError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the server tests: {exc}")
        pytest.skip(f"Triton server not installed here: {exc}")


@pytest.fixture
def triton(server_install, request):
    started = []

    def start(repo):
        server = TritonServer(repo, server_install)
        started.append(server)
        return server.start()

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for server in started:
        if failed:
            print(f"\n----- tritonserver log ({server.http_url}) -----\n{server.log()[-6000:]}")
        server.stop()
