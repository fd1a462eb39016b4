"""The deployment settings' defaults and bounds are declared once (flower/task.py): the ServerApp, `deploy`,
`site`, `simulate` and their CLI options take them from there."""
import inspect

import pytest

from fedclip_cache.federated.config import ConfigError
from fedclip_cache.flower import task


def test_deploy_site_and_simulate_default_to_the_declared_poll_intervals():
    from fedclip_cache import cli
    from fedclip_cache.launch import deploy, simulate, site

    def default(fn, name="poll_interval"):
        return inspect.signature(fn).parameters[name].default

    assert default(deploy.deploy) == default(deploy.Launch) == task.DEFAULT_POLL_INTERVAL
    assert default(site.run_site) == task.DEFAULT_POLL_INTERVAL
    assert default(cli.deploy).default == default(cli.site).default == task.DEFAULT_POLL_INTERVAL
    assert default(simulate.simulate) == default(cli.simulate).default == task.SIMULATION_POLL_INTERVAL


@pytest.mark.parametrize("interval, ok", [(task.MAX_POLL_INTERVAL, True), (task.MAX_POLL_INTERVAL * 1.01, False)])
def test_the_longest_poll_interval_is_one_bound(interval, ok):
    rc = {"sites": 2, "poll_interval": interval}
    if ok:
        task.check_deployment_keys(rc)
    else:
        with pytest.raises(ConfigError, match=f"at most {task.MAX_POLL_INTERVAL:g}"):
            task.check_deployment_keys(rc)
