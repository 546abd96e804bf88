"""deploy/: the systemd units, the example settings, install.sh, and the readiness helper.

The units are checked by systemd itself (`systemd-analyze verify`), on the real files, inside a
throw-away root that holds systemd's own units and stand-ins for the /opt/tandem/venv commands.
"""

import importlib.util
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tomllib
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from tandem.sd_notify import notify

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
INSTALL = DEPLOY / "install.sh"
SETUP = ".ci/setup-system.sh"
ROLES = ("draft-node", "target-node", "coordinator")
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectKernelTunables": "yes",
    "ProtectControlGroups": "yes",
    "LockPersonality": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
}
NODE_FLAGS = (
    "--transport",
    "--device",
    "--dtype",
    "--threads",
    "--max-sessions",
    "--max-context",
    "--tls-cert",
    "--tls-key",
    "--insecure",
)
COORDINATOR_FLAGS = ("--k", "--mode")


def need(tool: str) -> str:
    """The tool's path; in CI a missing tool fails the run instead of hiding a whole check."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed: run `bash {SETUP}` (apt: systemd, shellcheck, iproute2)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def settings(text: str) -> dict[str, list[str]]:
    """Unit (or env) file assignments, every value of a repeated key kept; sections flattened."""
    found: dict[str, list[str]] = defaultdict(list)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found[key.strip()].append(value.strip())
    return found


def unit_text(role: str) -> str:
    return (DEPLOY / f"tandem-{role}.service").read_text()


def exec_variables(role: str) -> set[str]:
    (exec_start,) = settings(unit_text(role))["ExecStart"]
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", exec_start))


def make_root(root: Path, units: dict[str, str], fake_commands: bool = True) -> Path:
    """A root for `systemd-analyze verify --root`: systemd's units, ours, and their commands."""
    system = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
        for key, values in settings(text).items():
            if not fake_commands or not key.startswith("Exec"):
                continue
            for value in values:
                command = root / value.split()[0].lstrip("-@:+!|").lstrip("/")
                command.parent.mkdir(parents=True, exist_ok=True)
                command.write_text("#!/bin/sh\nexit 0\n")
                command.chmod(0o755)
    return root


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    analyze = need("systemd-analyze")
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"}
    return subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", unit],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize("role", ROLES)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, role: str) -> None:
    name = f"tandem-{role}.service"
    root = make_root(tmp_path, {name: unit_text(role)})
    result = verify(root, name)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify {name}:\n{output}"


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: systemd's complaints come back through the same path."""
    broken = unit_text("draft-node").replace("Restart=on-failure", "Restart=sometimes")
    broken = broken.replace("LockPersonality=yes", "LockPersonalty=yes")
    result = verify(make_root(tmp_path / "typo", {"x.service": broken}), "x.service")
    assert "sometimes" in result.stdout + result.stderr
    assert "LockPersonalty" in result.stdout + result.stderr

    missing = make_root(tmp_path / "missing", {"x.service": unit_text("draft-node")}, fake_commands=False)
    result = verify(missing, "x.service")
    assert result.returncode != 0
    assert "/opt/tandem/venv/bin/draft-node" in result.stdout + result.stderr


@pytest.mark.parametrize("role", ROLES)
def test_unit_contract(role: str) -> None:
    text = unit_text(role)
    unit = settings(text)
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["User"] == one["Group"] == "tandem"
    assert one["Restart"] == "on-failure"
    assert one["EnvironmentFile"] == f"/etc/tandem/{role}.env"
    assert one["LoadCredential"] == "token:/etc/tandem/token"
    assert one["StandardOutput"] == "journal"
    assert one["StateDirectory"] == one["CacheDirectory"] == f"tandem-{role}"
    assert one["WantedBy"] == "multi-user.target"
    for key, value in HARDENING.items():
        assert unit.get(key) == [value], f"{key}= should be {value!r}, is {unit.get(key)}"
    assert "MemoryDenyWriteExecute" not in unit  # torch's JIT needs W^X exceptions
    assert re.search(r"^#.*MemoryDenyWriteExecute.*\n(#.*\n)*#.*JIT", text, re.M), "say why it is left out"

    (exec_start,) = unit["ExecStart"]
    command, *args = exec_start.split()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command == f"/opt/tandem/venv/bin/{role}" and role in scripts
    joined = " ".join(args)
    assert "--auth-token-file %d/token" in joined  # the LoadCredential= copy, the only token path
    assert "--listen ${TANDEM_LISTEN}" in joined and args[-1] == "$TANDEM_ARGS"
    if role == "coordinator":
        assert "--draft ${TANDEM_DRAFT} --target ${TANDEM_TARGET}" in joined
    else:
        assert "--model ${TANDEM_MODEL}" in joined
        assert "/opt/tandem/models" in one["ReadOnlyPaths"]


@pytest.mark.parametrize("role", ROLES)
def test_example_env_file(role: str) -> None:
    """Every setting is explained, and the file sets exactly what the unit's ExecStart uses."""
    lines = (DEPLOY / "env" / f"{role}.env").read_text().splitlines()
    keys = []
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, _ = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"line {i + 1}: not KEY=value: {line!r}"
        assert i > 0 and lines[i - 1].startswith("#"), f"{key} has no comment right above it"
        keys.append(key)
    assert len(keys) == len(set(keys))
    assert set(keys) == exec_variables(role)
    comments = "\n".join(line for line in lines if line.startswith("#"))
    for flag in COORDINATOR_FLAGS if role == "coordinator" else NODE_FLAGS:
        assert re.search(rf"{flag}\b", comments), f"{flag} is not documented in {role}.env"


@pytest.mark.parametrize("role", ROLES)
def test_example_flags_exist_in_cli(role: str) -> None:
    """The flags the units and the examples pass are ones the real command accepts."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][role]
    module, func = target.split(":")
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    env = settings((DEPLOY / "env" / f"{role}.env").read_text())
    exec_start = settings(unit_text(role))["ExecStart"][0]
    used = re.findall(r"(?<!\S)--[a-z][a-z0-9-]*", exec_start + " " + env["TANDEM_ARGS"][0])
    documented = COORDINATOR_FLAGS if role == "coordinator" else NODE_FLAGS
    for flag in {*used, *documented}:
        assert re.search(rf"{flag}\b", result.stdout), f"{role} --help does not offer {flag}"


# --- sd_notify ------------------------------------------------------------------------------


def receive(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    return sock.recv(4096)


def test_notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("READY=1") is True
        assert receive(server) == b"READY=1"
        assert notify("STATUS=serving on 0.0.0.0:50052") is True
        assert receive(server) == b"STATUS=serving on 0.0.0.0:50052"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tandem-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1") is True
        assert receive(server) == b"READY=1"


def test_notify_from_a_child_process(tmp_path: Path) -> None:
    """As under systemd: the variable comes from the environment of a fresh process."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        code = "import sys; from tandem.sd_notify import notify; sys.exit(0 if notify('READY=1') else 1)"
        env = {**os.environ, "NOTIFY_SOCKET": str(path)}
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)
        assert receive(server) == b"READY=1"


def exec_start_argv(role: str, values: dict[str, str], credentials: Path) -> list[str]:
    """The unit's ExecStart as systemd expands it: ${X} one word, $X split at spaces, %d."""
    (exec_start,) = settings(unit_text(role))["ExecStart"]
    argv: list[str] = []
    for word in exec_start.split()[1:]:
        if match := re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(values[match[1]])
        elif match := re.fullmatch(r"\$(\w+)", word):
            argv.extend(values[match[1]].split())
        else:
            argv.append(word.replace("%d", str(credentials)))
    return argv


@pytest.mark.slow
@pytest.mark.parametrize("role", ["draft-node"])  # target-node runs the same node_cli start-up
def test_node_started_like_the_unit_reports_ready(tmp_path: Path, role: str, smollm2: Path) -> None:
    """Type=notify holds only if the real node, run with the unit's arguments, sends READY=1."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][role]
    module, func = target.split(":")
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "token").write_text("0123456789abcdef" * 4 + "\n")
    values = settings((DEPLOY / "env" / f"{role}.env").read_text())
    env_values = {key: value[-1].strip('"') for key, value in values.items()}
    env_values |= {"TANDEM_MODEL": str(smollm2), "TANDEM_LISTEN": "127.0.0.1:0"}
    argv = exec_start_argv(role, env_values, credentials)
    code = f"import sys; from {module} import {func}; sys.argv[0] = {role!r}; sys.exit({func}())"
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(120)
        env = {**os.environ, "NOTIFY_SOCKET": str(path)}
        node = subprocess.Popen(
            [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            try:
                ready = server.recv(4096)
            except TimeoutError:
                ready = b""
            assert ready == b"READY=1", f"{role} never reported READY=1; exit {node.poll()}"
            node.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
            server.settimeout(30)
            assert server.recv(4096) == b"STOPPING=1"
            assert node.wait(timeout=60) == 0
        finally:
            if node.poll() is None:
                node.kill()
            _, stderr = node.communicate(timeout=30)
    assert "serving" in stderr, stderr


def test_notify_without_systemd_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))  # stale socket: no crash
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/name")
    assert notify("READY=1") is False


def test_notify_rejects_an_empty_state() -> None:
    with pytest.raises(ValueError, match="READY=1"):
        notify("")


# --- install.sh -----------------------------------------------------------------------------


def run_install(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_install_script_parses_and_is_executable() -> None:
    for script in (INSTALL, ROOT / SETUP):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
        assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"


def test_install_script_is_shellcheck_clean() -> None:
    shellcheck = need("shellcheck")
    result = subprocess.run([shellcheck, str(INSTALL), str(ROOT / SETUP)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_script_help_and_bad_arguments(tmp_path: Path) -> None:
    result = run_install("--help")
    assert result.returncode == 0 and "--role" in result.stdout and "--uninstall" in result.stdout
    for args, message in [
        (["--frobnicate"], "unknown argument '--frobnicate'"),
        (["--role", "drafty", "--root", tmp_path], "unknown role 'drafty'"),
        (["--root", tmp_path], "choose what this machine runs"),
        (["--role"], "--role needs a value"),
        (["--purge", "--root", tmp_path], "--purge only goes with --uninstall"),
        (["--role", "draft", "--root", tmp_path / "absent"], "is not a directory"),
    ]:
        result = run_install(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not any(tmp_path.iterdir())  # refused before touching anything


def test_install_and_uninstall_under_root(tmp_path: Path) -> None:
    need("systemctl")
    root = tmp_path
    etc, units = root / "etc/tandem", root / "etc/systemd/system"
    wants = units / "multi-user.target.wants"

    result = run_install("--role", "draft,coordinator", "--root", root)
    assert result.returncode == 0, result.stderr
    for role in ("draft-node", "coordinator"):
        assert (units / f"tandem-{role}.service").read_text() == unit_text(role)
        assert (wants / f"tandem-{role}.service").is_symlink()
        env = etc / f"{role}.env"
        assert env.read_text() == (DEPLOY / "env" / f"{role}.env").read_text()
        assert stat.S_IMODE(env.stat().st_mode) == 0o640
    assert not (units / "tandem-target-node.service").exists()
    assert not (etc / "target-node.env").exists()
    token = (etc / "token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", token)
    assert stat.S_IMODE((etc / "token").stat().st_mode) == 0o640
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    assert (root / "opt/tandem/models").is_dir()

    # Running again adds a role and never overwrites what the administrator wrote.
    (etc / "draft-node.env").write_text("TANDEM_MODEL=/opt/tandem/models/mine.gguf\n")
    (etc / "token").write_text("kept\n")
    result = run_install("--role", "target", "--root", root)
    assert result.returncode == 0, result.stderr
    assert (etc / "draft-node.env").read_text() == "TANDEM_MODEL=/opt/tandem/models/mine.gguf\n"
    assert (etc / "token").read_text() == "kept\n"
    assert (wants / "tandem-target-node.service").is_symlink()

    result = run_install("--uninstall", "--role", "draft", "--root", root)
    assert result.returncode == 0, result.stderr
    assert not (units / "tandem-draft-node.service").exists()
    assert not (wants / "tandem-draft-node.service").exists()
    assert (units / "tandem-coordinator.service").exists()

    result = run_install("--uninstall", "--root", root)
    assert result.returncode == 0, result.stderr
    assert not list(units.glob("tandem-*")) and not list(wants.glob("tandem-*"))
    assert (etc / "draft-node.env").exists() and (root / "opt/tandem/models").is_dir()

    result = run_install("--uninstall", "--purge", "--root", root)
    assert result.returncode == 0, result.stderr
    assert not etc.exists() and not (root / "opt/tandem").exists()
