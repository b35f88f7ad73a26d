"""Built-in check: every unit of the app runs sandboxed, as systemd rates it (`systemd-analyze security`)."""

import pytest

from provision.layout import Layout
from provision.sandboxing import MAX_EXPOSURE, exposure_command, exposure_problem


def test_every_unit_of_the_app_is_sandboxed(host, app):
    """The live slot's web unit, each process's unit and each timer's service, and the health monitor's
    (root's, app.monitor): exposure 3.0 at most."""
    if app.get("container"):
        pytest.skip(f"{app['name']} is a container app: its units run {app['engine']} as root, the container "
                    "is its sandbox (no capabilities, no new privileges)")
    slot = Layout(app["name"]).live_slot(host.file(app["upstream_file"]).content_string)
    assert slot, f"no live slot: {app['upstream_file']} names no socket of {app['name']}; deploy first"
    units = [f"{app['units'][slot]}.service", *app["process_units"], *app.get("monitor_units", ())]
    problems = []
    for unit in units:
        res = host.run(exposure_command(unit))
        problem = exposure_problem(unit, res.rc, res.stdout + res.stderr)
        if problem:
            problems.append(problem)
    assert not problems, f"units above exposure {MAX_EXPOSURE}:\n" + "\n".join(problems)
