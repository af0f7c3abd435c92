import pytest

from appliance import Appliance


@pytest.fixture
def appliance_factory(tmp_path):
    """Start appliances in the test's temp dir; every process is stopped by pid at the end."""
    started = []

    def make(sections=None, users=None, http=False, name=None, start=True):
        name = name or f"app{len(started)}"
        d = tmp_path / name
        d.mkdir()
        app = Appliance(d, sections, users or {"alice": "alice-pass"}, http=http)
        started.append(app)
        return app.start() if start else app
    yield make
    for app in started:
        app.stop()
