"""pytest plugin for `fab check` (loaded with -p, so user checks get it too): ``host`` comes from pytest-testinfra; ``app``
is this host's app settings as `fab check` resolved them."""

import json
import os

import pytest


@pytest.fixture
def app(host):
    settings = json.loads(os.environ["PROVISION_CHECK_SETTINGS"])
    return settings[host.backend.host.name]
