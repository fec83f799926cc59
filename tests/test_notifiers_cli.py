"""The ``notifiers`` program and its settings (real process, 127.0.0.1 only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devstack.loopback import free_port
from devstack.process import stop_and_collect
from notifiers.build import build_service
from notifiers.providers.apns import PASSWORD_ENV
from notifiers.providers.base import ProviderConfigError
from notifiers.settings import (
    OPTIONS,
    ProxySettings,
    build_parser,
    settings_from_args,
    settings_from_mapping,
)
from notifiers.tokens import Kind

CLI = [sys.executable, "-m", "notifiers.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_upstream_and_own_options():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in (
        "--certificate-file",
        "--password-file",
        "--topic",
        "--host",
        "--port",
        "--metrics",
        "--fcm-key-path",
        "--interval",
        "--db",
        "--apns-key-file",
        "--apns-key-id",
        "--apns-team-id",
        "--apns-url",
        "--apns-sandbox-url",
        "--fcm-url",
        "--fcm-token-url",
        "--fcm-project-id",
        "--log-provider",
        "--debounce-seconds",
        "--debounce-max-entries",
        "--log-level",
    ):
        assert option in proc.stdout
    assert "without it, heartbeats are off" in " ".join(proc.stdout.split())
    assert PASSWORD_ENV in proc.stdout
    # Only options that work: Web Push, openpgp: decryption and upstream forwarding (issue 8).
    assert "--vapid-key-path" in proc.stdout and "--webpush-allowed-endpoints" in proc.stdout
    for option in ("--openpgp-keyring-path", "--upstream-url", "--forward-all"):
        assert option in proc.stdout


def test_password_on_argv_is_refused():
    proc = run_cli("--password", "hunter2")
    assert proc.returncode == 2
    assert "--password-file" in proc.stderr


def test_broken_certificate_is_a_one_line_error(tmp_path):
    cert = tmp_path / "broken.p12"
    cert.write_bytes(b"this is not PKCS#12")
    proc = run_cli("--certificate-file", str(cert), "--port", str(free_port()))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("notifiers: error:")]
    assert len(errors) == 1 and "broken.p12" in errors[0]
    assert "Traceback" not in proc.stderr


def test_missing_fcm_key_is_a_one_line_error(tmp_path):
    proc = run_cli("--fcm-key-path", str(tmp_path / "nope.json"), "--port", str(free_port()))
    assert proc.returncode == 1
    assert "notifiers: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("notifiers: error:")]
    return line


def test_unresolvable_host_names_the_address():
    port = free_port()
    line = _one_error_line(run_cli("--log-provider", "--host", "256.1.1.1", "--port", str(port)))
    assert line.startswith(f"notifiers: error: cannot listen on 256.1.1.1:{port}: ")


def test_taken_ports_name_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_error_line(run_cli("--log-provider", "--port", str(port)))
        assert line.startswith(f"notifiers: error: cannot listen on 127.0.0.1:{port}: ")
        assert line.endswith("Address already in use")
        metrics = f"127.0.0.1:{port}"
        proc = run_cli("--log-provider", "--port", str(free_port()), "--metrics", metrics)
        line = _one_error_line(proc)
        assert line.startswith(f"notifiers: error: cannot listen on {metrics}: ")


def test_embedded_metrics_port_taken_names_the_address():
    from notifiers.embedded import start_embedded

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"^cannot listen on {address}: "):
            start_embedded({"log_provider": "true", "metrics": address})


def _wait_for(url: str, deadline: float) -> None:
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _post(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serves_notify_and_metrics_and_stops_on_sigterm(tmp_path):
    port, mport = free_port(), free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # Type=notify readiness
    notify.bind(str(tmp_path / "notify.socket"))
    notify.settimeout(20)
    proc = subprocess.Popen(
        [*CLI, "--log-provider", "--port", str(port), "--metrics", f"127.0.0.1:{mport}"],
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.socket")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert notify.recv(100) == b"READY=1"  # sent once both listeners are up
        base = f"http://127.0.0.1:{port}"
        _wait_for(base + "/", time.monotonic() + 20)
        assert _post(base + "/notify", b"fcm-chat.delta:abc") == 200
        assert _post(base + "/notify", b"fcm-broken") == 400
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "fcm_notifications_total 1.0" in text
        _, err = stop_and_collect(proc, 20)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "log provider" in err
    assert "shutting down" in err
    assert "abc" not in err


# -- settings ---------------------------------------------------------------------------


def test_settings_from_args_defaults():
    s = settings_from_args([], env={})
    assert (s.host, s.port, s.metrics) == ("127.0.0.1", 9000, None)
    assert s.debounce_seconds == 10.0 and s.debounce_max_entries == 1_000_000
    assert s.ubports and not s.log_provider
    assert s.certificate_password is None


def test_password_file_and_env(tmp_path):
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret\n")
    s = settings_from_args(["--password-file", str(pw)], env={PASSWORD_ENV: "other"})
    assert s.certificate_password == b"s3cret"
    assert "s3cret" not in repr(s)
    assert settings_from_args([], env={PASSWORD_ENV: "envpw"}).certificate_password == b"envpw"


def test_settings_from_mapping_ini_keys(tmp_path):
    s = settings_from_mapping(
        {
            "host": "0.0.0.0",
            "port": "9100",
            "metrics": "127.0.0.1:9101",
            "certificate_file": str(tmp_path / "c.p12"),
            "topic": "chat.delta",
            "fcm-key-path": str(tmp_path / "k.json"),
            "ubports": "false",
            "log_provider": "yes",
            "debounce_seconds": "2.5",
            "debounce_max_entries": "1000",
            "apns_concurrency": "7",
            "fcm_rps": "20",
            "fcm_max_wait": "3",
        },
        env={},
    )
    assert s.host == "0.0.0.0" and s.port == 9100
    assert s.metrics_address == ("127.0.0.1", 9101)
    assert s.certificate_file == tmp_path / "c.p12" and s.topic == "chat.delta"
    assert s.fcm_key_path == tmp_path / "k.json"
    assert s.ubports is False and s.log_provider is True
    assert s.debounce_seconds == 2.5 and s.debounce_max_entries == 1000
    assert s.limits["APNS"].concurrency == 7
    assert s.limits["FCM"].rps == 20 and s.limits["FCM"].max_wait == 3


def test_every_option_is_both_a_flag_and_an_ini_key():
    """One declaration drives both: each option is in --help and accepted in [notifiers]."""
    usage = build_parser().format_help()
    keys = {}
    for option in OPTIONS:
        if option.secret:
            assert f"{option.flag}-file" in usage
            keys[option.file_key] = ""
        else:
            negated = option.is_switch and option.default
            assert (f"--no-{option.flag[2:]}" if negated else option.flag) in usage
            keys[option.name] = ""
    assert "--apns-concurrency" in usage and "--ubports-max-wait" in usage
    assert repr(settings_from_mapping(keys, env={})) == repr(ProxySettings())  # "" = default


@pytest.mark.parametrize("key", ["vapid_key_pth", "openpgp_keyring_pth", "fcm_key_pth"])
def test_unknown_ini_keys_are_an_error_naming_the_key(key):
    with pytest.raises(ValueError, match=f"unknown notifiers option '{key}'"):
        settings_from_mapping({key: "/x"}, env={})


@pytest.mark.parametrize(
    "values",
    [
        {"password": "x"},
        {"no_such_option": "1"},
        {"port": "http"},
        {"log_provider": "maybe"},
        {"metrics": "9001"},
        {"debounce_seconds": "0"},
    ],
)
def test_settings_from_mapping_rejects(values):
    with pytest.raises(ValueError):
        settings_from_mapping(values, env={})


def test_build_service_with_log_provider_serves_every_kind():
    service = build_service(ProxySettings(log_provider=True))
    assert set(service.providers) == set(Kind)


def test_build_service_without_credentials_enables_only_ubports(caplog):
    caplog.set_level("INFO")
    service = build_service(ProxySettings())
    assert set(service.providers) == {Kind.UBPORTS}
    assert "APNS: disabled" in caplog.text and "FCM: disabled" in caplog.text
    assert "UBports: enabled" in caplog.text


def test_build_service_broken_key_raises_config_error(tmp_path: Path):
    key = tmp_path / "AuthKey.p8"
    key.write_text("garbage")
    with pytest.raises(ProviderConfigError):
        build_service(ProxySettings(apns_key_file=key, apns_key_id="K", apns_team_id="T"))
    with pytest.raises(ProviderConfigError):
        build_service(ProxySettings(apns_key_file=key))  # no key id / team id
