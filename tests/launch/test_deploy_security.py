"""Deployments that keep to their own files, and a multi-machine recipe with TLS and SuperNode authentication."""
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedclip_cache.launch import deploy as dep  # noqa: E402
from fedclip_cache.errors import ConfigError  # noqa: E402
from fedclip_cache.federated.config import FederateConfig  # noqa: E402
from fedclip_cache.synthetic import write_synthetic_cache  # noqa: E402

DOMAINS = ("art", "photo", "sketch")
SITE_PREFIX = "fedclip-site-"  # launch.site.SITE_PREFIX (spelled out: the name users see in /tmp)


def _sites(root, domains=DOMAINS, n=30):
    return [str(write_synthetic_cache(root / f"site-{d}", {d: n}, 3, dim=16, seed=1)) for d in domains]


def _private_tmp(tmp_path, monkeypatch) -> Path:
    """A temporary folder of this test's own (this process and every process it starts): what is left in it after
    a command is what the command left."""
    t = tmp_path / "tmp"
    t.mkdir()
    monkeypatch.setenv("TMPDIR", str(t))
    monkeypatch.setattr(tempfile, "tempdir", str(t))
    return t


@pytest.mark.slow
def test_deploy_leaves_no_site_folder_and_deletes_only_its_own_logs(tmp_path, monkeypatch):
    """A deploy leaves no /tmp/fedclip-site-* (each holds a SuperExec secret) although its sites end by SIGKILL, and
    `deploy -o RUN` deletes only its own logs in RUN/logs/, never the user's."""
    t = _private_tmp(tmp_path, monkeypatch)
    sites = _sites(tmp_path)
    run = tmp_path / "run"
    logs = run / "logs"
    logs.mkdir(parents=True)
    (logs / "notes.txt").write_text("mine")
    (logs / "mine.log").write_text("mine too")
    (logs / "serverapp.log").write_text("[SUMMARY] an earlier run\n")  # deploy's own: replaced by this run's
    cfg = FederateConfig(rounds=1, hidden=8, heldout=["sketch"]).validate()
    res = dep.deploy(sites, run, cfg, timeout=240, log=lambda m: None)
    assert res["status"] == "finished:completed"
    assert sorted(p.name for p in t.iterdir()) == []  # no fedclip-site-*, no fedclip-deploy-*
    assert (logs / "notes.txt").read_text() == "mine" and (logs / "mine.log").read_text() == "mine too"
    assert "an earlier run" not in (logs / "serverapp.log").read_text()
    assert json.loads((logs / dep.LOGS_MANIFEST).read_text()) == sorted(dep.own_logs(list(DOMAINS), "worker"))


def test_only_logs_a_deploy_wrote_are_removed(tmp_path):
    """The logs a run writes and those the last run listed go; a user's files and anything a damaged list names
    outside the folder stay."""
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    for name in ("notes.txt", "mine.log", "serverapp.log", "site-art.log", "site-gone.log", "deploy.json"):
        (logs / name).write_text("x")
    (tmp_path / "run" / "outside.log").write_text("x")
    (logs / dep.LOGS_MANIFEST).write_text(json.dumps(["site-gone.log", "../outside.log", "/etc/passwd", 3]))
    dep.clear_own_logs(logs, dep.own_logs(["art"], "worker"))
    assert sorted(p.name for p in logs.iterdir()) == sorted(["notes.txt", "mine.log", dep.LOGS_MANIFEST])
    assert (tmp_path / "run" / "outside.log").exists()
    (logs / dep.LOGS_MANIFEST).write_text("{damaged")  # a damaged list: this run's own names only
    dep.clear_own_logs(logs, dep.own_logs(["art"], "worker"))
    assert sorted(p.name for p in logs.iterdir()) == sorted(["notes.txt", "mine.log", dep.LOGS_MANIFEST])


def _site_folders(t: Path) -> set:
    return {p for p in t.glob(SITE_PREFIX + "*") if (p / "superexec-secret").exists()}


def _start_site(cache, t: Path, log: Path) -> subprocess.Popen:
    # no SuperLink there: the SuperNode retries, the site runs (with its secret) until stopped
    return subprocess.Popen([sys.executable, "-m", "fedclip_cache", "site", cache, "--superlink", "127.0.0.1:1",
                             "--insecure", "--port", str(dep.free_port())], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "TMPDIR": str(t)})


@pytest.mark.slow
def test_a_site_secret_never_outlives_the_site(tmp_path, monkeypatch, wait_until):
    """`fedclip-cache site`: its secret is 0600 in a 0700 folder; SIGTERM removes the folder; one left by a site killed
    with kill -9 is removed by the next site."""
    t = _private_tmp(tmp_path, monkeypatch)
    cache = _sites(tmp_path, ("art",))[0]
    log = tmp_path / "site.log"
    p = _start_site(cache, t, log)
    try:
        (first,) = wait_until(lambda: _site_folders(t))
        p.send_signal(signal.SIGTERM)  # at once: while it imports flwr and torch
        p.wait(timeout=30)
        assert not first.exists(), log.read_text()[-2000:]
        p = _start_site(cache, t, log)
        wait_until(lambda: "worker ready" in log.read_text())  # up: flwr's own signal handlers in place
        (up,) = _site_folders(t)
        assert stat.S_IMODE(up.stat().st_mode) == 0o700
        assert stat.S_IMODE((up / "superexec-secret").stat().st_mode) == 0o600
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not up.exists(), log.read_text()[-2000:]
        p = _start_site(cache, t, log)
        (second,) = wait_until(lambda: _site_folders(t))
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        assert second.exists()  # kill -9: nothing could clean up
        p = _start_site(cache, t, log)
        third = wait_until(lambda: _site_folders(t) - {second})
        assert not second.exists() and len(third) == 1  # the dead site's folder swept; its own made
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.parametrize("domain", ["../x", "a/b", ".."])
def test_deploy_refuses_domain_names_that_are_not_file_names(tmp_path, domain):
    """A domain "../x" reached `logs/site-../x.log` (FileNotFoundError after start-up): refused first, one line."""
    sites = [str(write_synthetic_cache(tmp_path / f"s{i}", {d: 10}, 3, dim=8, seed=1))
             for i, d in enumerate(["art", domain, "photo"])]
    with pytest.raises(ConfigError, match=r"domain name .* cannot name a file") as ex:
        dep.check_sites(sites, FederateConfig(heldout=["art"]))
    assert "\n" not in str(ex.value)


# --- the multi-machine recipe of the README, run as written (item 10) ---

README = Path(__file__).resolve().parents[2] / "docs" / "flower.md"  # the page holding the recipe


def _readme_block(lang: str, marker: str) -> str:
    """The README's ```lang block that starts with ``marker`` (the recipe is read from ONE place: the README)."""
    import re

    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S) if b.startswith(marker)]
    assert len(blocks) == 1, f"README: {len(blocks)} ```{lang} blocks hold {marker!r}"
    return blocks[0]


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_readme_recipe_runs_with_tls_and_supernode_authentication(tmp_path, wait_until):
    """The README's multi-machine recipe on this machine: certificates and keys made by its own commands, the
    SuperLink from `fedclip-cache superlink` (Fleet API only on the sites' address, Control API on loopback), three
    sites with TLS and registered keys; the run completes. A SuperNode without a registered key is refused (with
    no key, and with a key nobody registered), and the Control API is not served on the Fleet address."""
    import re
    import shlex
    import ssl
    import tomllib
    import urllib.error
    import urllib.request

    import tomli_w

    if dep.flower_bin_dir() is None or not all(map(shutil_which, ("openssl", "ssh-keygen"))):
        pytest.fail("needs Flower's CLIs, openssl and ssh-keygen")
    work = tmp_path / "work"
    (work / "home").mkdir(parents=True)
    (work / "app").mkdir()
    caches = dict(zip(DOMAINS, _sites(tmp_path)))
    fleet, control = dep.free_port(), dep.free_port()
    env = {**os.environ, "FLWR_HOME": str(work / "home"), "FLWR_TELEMETRY_ENABLED": "0",
           "PATH": dep.flower_bin_dir() + os.pathsep + os.environ.get("PATH", "")}
    # the connection and the app, from the README (the run folder, its rounds and adapter size replaced)
    conn = _readme_block("toml", "[superlink]\ndefault = \"pacs\"").replace("8000", str(control)).replace("/path/to/", f"{work}/")
    (work / "home" / "config.toml").write_text(conn)
    app = tomllib.loads(_readme_block("toml", "[project]\nname = \"fedclip-deploy\""))
    app["tool"]["flwr"]["app"]["config"].update(out=str(tmp_path / "run"), rounds=2, hidden=8)
    (work / "app" / "pyproject.toml").write_text(tomli_w.dumps(app))

    def fill(line: str, **site) -> str:
        line = re.sub(r"\b9092\b", str(fleet), re.sub(r"\b8000\b", str(control), line))
        line = line.replace("superlink.example.org", "localhost")
        if site:
            line = line.replace("site_key", f"{site['dom']}_key").replace("/site/cache", site["cache"])
            line = re.sub(r"\b9094\b", str(site["port"]), line)
        return line

    procs, logs = [], {}

    def background(name: str, line: str) -> subprocess.Popen:
        logs[name] = work / f"{name}.log"
        p = subprocess.Popen(["bash", "-c", "exec " + line], cwd=work, env=env, stdout=open(logs[name], "wb"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def run(*lines: str) -> str:
        """Run ``lines`` side by side (one line's copies for the sites: they run on different machines); all must
        succeed. Returns the last one's output."""
        ps = [(ln, subprocess.Popen(["bash", "-c", ln], cwd=work, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)) for ln in lines]
        for ln, p in ps:
            stdout, stderr = p.communicate(timeout=240)
            assert p.returncode == 0, f"{ln}\n{stdout[-3000:]}\n{stderr[-3000:]}"
        return stdout

    lines = [ln.strip() for ln in _readme_block("bash", "# (1) on the server, once: a CA").splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    site_lines = [ln for ln in lines if "site_key" in ln or "/site/cache" in ln]
    assert len(site_lines) == 3 and any(ln.startswith("fedclip-cache superlink") for ln in lines)
    def start_strangers() -> list:
        """The recipe's site line without its key, and with a fresh key nobody registered."""
        site = next(ln for ln in site_lines if ln.startswith("fedclip-cache site "))
        run("ssh-keygen -q -t ecdsa -b 384 -N '' -f stranger_key")
        return [background("no-key", fill(site.replace(" --auth-supernode-private-key site_key", ""),
                                          dom="art", cache=caches["art"], port=dep.free_port())[:-1]),
                background("stranger", fill(site, dom="stranger", cache=caches["art"], port=dep.free_port())[:-1])]

    out = ""
    strangers = []
    try:
        for line in lines:
            sites = [dict(dom=d, cache=c, port=dep.free_port()) for d, c in caches.items()] if line in site_lines \
                else [{}]
            cmds = [fill(line, **site) for site in sites]
            if line.endswith("&"):
                for site, cmd in zip(sites, cmds):
                    background(site.get("dom", cmd.split()[1]), cmd[:-1].strip())
                if not sites[0]:  # the SuperLink: ready when both its ports are (what a person waits for)
                    wait_until(lambda: _port_open(control) and _port_open(fleet) or procs[-1].poll() is not None)
                    assert procs[-1].poll() is None, logs["superlink"].read_text()[-3000:]
                    strangers = start_strangers()  # beside the recipe's own steps (they take a site's start-up)
            elif "RUN_ID" in line:
                run_id = re.search(r"Successfully started run (\d+)", out).group(1)
                status = json.loads(run(cmds[0].replace("RUN_ID", run_id)))
                assert status["runs"][0]["status"] == "finished:completed", status
            else:
                out = run(*cmds)
        # the run: every site took part, with TLS and its registered key
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert [(r["fit_results"], r["fit_failures"]) for r in summary["deployment"]["rounds"]] == [(2, 0), (2, 0)]
        # a SuperNode without a registered key is refused (started with the SuperLink: start_strangers)
        # no key: it asks to register itself (refused: "must be registered via the CLI"); an unregistered key:
        # its activation is refused (the SuperLink knows no node with that key); both end the site, exit 1
        for p, name, why in zip(strangers, ("no-key", "stranger"),
                                ("All SuperNodes must be registered via the CLI", "Failed to activate SuperNode")):
            assert p.wait(timeout=120) == 1
            text = logs[name].read_text()
            assert why in text and "Exit Code: 305" in text, text[-3000:]
        assert "No SuperNode found with the given public key" in logs["superlink"].read_text()
        # the Control API answers on loopback only; the Fleet address serves the Fleet API alone
        tls = ssl.create_default_context(cafile=str(work / "ca.crt"))

        def post(port: int, path: str) -> int:
            req = urllib.request.Request(f"https://localhost:{port}{path}", data=b"", method="POST",
                                         headers={"Content-Type": "application/protobuf"})
            try:
                return urllib.request.urlopen(req, context=tls, timeout=10).status
            except urllib.error.HTTPError as ex:
                return ex.code

        assert post(control, "/v1/control/list-runs") == 200
        assert post(fleet, "/v1/control/list-runs") == 404
        assert post(fleet, "/v1/control/start-run") == 404
        assert post(fleet, "/v1/runtime/acquire-task") == 404
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def shutil_which(name: str):
    import shutil

    return shutil.which(name)


def _site_cli(args):
    from typer.testing import CliRunner

    from fedclip_cache import cli

    return CliRunner().invoke(cli.app, ["site", *args])


def test_site_checks_its_tls_and_authentication_files_in_one_line(tmp_path):
    """`site` had no SuperNode-authentication option; a missing CA file surfaced as flwr's multi-line exit text
    after start-up. Each file is checked first: one line naming the option."""
    cache = _sites(tmp_path, ("art",))[0]
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    notpem = tmp_path / "notpem.crt"
    notpem.write_text("hello")
    rsa = tmp_path / "rsa_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(rsa)], check=True)
    base = [cache, "--superlink", "127.0.0.1:1", "--port", str(dep.free_port())]
    cases = [
        (["--root-certificates", str(tmp_path / "missing.crt")], "--root-certificates"),
        (["--root-certificates", str(notpem)], "no PEM certificate"),
        (["--root-certificates", str(ca), "--auth-supernode-private-key", str(tmp_path / "nokey")],
         "--auth-supernode-private-key"),
        (["--root-certificates", str(ca), "--auth-supernode-private-key", str(rsa)], "not an unencrypted EC"),
        (["--root-certificates", str(ca), "--auth-supernode-private-key", str(ca)], "not an unencrypted EC"),
        (["--insecure", "--auth-supernode-private-key", str(rsa)], "needs TLS"),
        (["--insecure", "--root-certificates", str(ca)], "give one"),
    ]
    for args, match in cases:
        res = _site_cli([*base, *args])
        assert isinstance(res.exception, ConfigError), (args, res.output, res.exception)
        assert match in str(res.exception) and "\n" not in str(res.exception), (args, str(res.exception))


def test_site_passes_the_authentication_key_to_its_supernode(tmp_path):
    from fedclip_cache.launch.site import check_site_credentials, supernode_args

    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True)
    extra = check_site_credentials(False, None, key)
    args = supernode_args("c", "h:1", 9, insecure=False, root_certificates="ca.crt", secret_file="s", extra=extra)
    assert args[args.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert args[args.index("--root-certificates") + 1] == "ca.crt" and "--insecure" not in args


@pytest.mark.parametrize("args, match", [
    (["--fleet-address", "0.0.0.0:9092", "--host", "0.0.0.0", "--insecure"], "--host 0.0.0.0"),
    (["--fleet-address", "0.0.0.0:9092", "--insecure"], "--insecure with --fleet-address"),
    (["--fleet-address", "nonsense", "--insecure"], "--fleet-address 'nonsense'"),
])
def test_superlink_keeps_the_control_api_on_loopback(args, match):
    """`fedclip-cache superlink` refuses (one line) a Control API off loopback and a Fleet API off this machine
    without TLS."""
    from typer.testing import CliRunner

    from fedclip_cache import cli

    res = CliRunner().invoke(cli.app, ["superlink", *args])
    assert isinstance(res.exception, ConfigError) and match in str(res.exception), (res.output, res.exception)


def test_fleet_address_passes_the_fleet_api_only():
    from fedclip_cache.launch.fleet_gate import allowed

    assert allowed("POST", "/v1/fleet/register-node") and allowed("GET", "/health")
    for method, path in [("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/acquire-task"),
                         ("POST", "/v1/fleet/../control/start-run"), ("GET", "/docs"), ("GET", "/openapi.json"),
                         ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/"), ("POST", "/health")]:
        assert not allowed(method, path), (method, path)


def test_a_folder_where_a_log_goes_is_a_one_line_error(tmp_path):
    logs = tmp_path / "logs"
    (logs / "serverapp.log").mkdir(parents=True)
    with pytest.raises(ConfigError, match="serverapp.log") as ex:
        dep.clear_own_logs(logs, dep.own_logs(["art"], "worker"))
    assert "\n" not in str(ex.value)
