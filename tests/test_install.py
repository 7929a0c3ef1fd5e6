"""``install.sh`` as a real process on a copy of the project, in a temporary HOME.

A real systemd user instance is not available to tests, so ``systemctl`` is a stub on PATH
that logs its arguments; ``LLAMA_SERVER_SKIP_VENV=1`` keeps the runs fast and offline (the
venv step is covered by ``--dry-run``, which prints the commands it would run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

from config import CONFIG_ENV, ENV_KEYS, ManagerSettings

TIMEOUT = 30  # every install.sh run is bounded by this
UNIT_NAME = "llama-cpp-server.service"
RPC_UNIT_NAME = "llama-cpp-rpc-worker.service"
PROJECT_FILES = ["install.sh", UNIT_NAME, RPC_UNIT_NAME, ".env.example", "scripts", "requirements.txt",
                 "config.json"]
JOURNAL_COMMAND = "journalctl --user -u llama-cpp-server -f"

SYSTEMCTL_STUB = """#!/bin/sh
# Logs every call; `--user show-environment` exits with $SYSTEMCTL_SHOW_RC (default 0).
echo "$*" >> "$SYSTEMCTL_LOG"
if [ "$1 $2" = "--user show-environment" ]; then exit "${SYSTEMCTL_SHOW_RC:-0}"; fi
exit 0
"""
FAILING_STUB = "#!/bin/sh\nexit 1\n"


@dataclass
class Installer:
    """A copy of the project, a HOME, and a PATH with a logging ``systemctl`` stub."""

    project: Path
    home: Path
    env: dict[str, str]
    log: Path

    @property
    def unit(self) -> Path:
        return self.home / ".config" / "systemd" / "user" / UNIT_NAME

    @property
    def rpc_unit(self) -> Path:
        return self.home / ".config" / "systemd" / "user" / RPC_UNIT_NAME

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.project / "install.sh"), *args], env={**self.env, **env},
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)

    def calls(self) -> list[str]:
        """The systemctl calls so far, ``show-environment`` probes left out."""
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if line != "--user show-environment"]


@pytest.fixture
def installer(tmp_path: Path) -> Installer:
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name)
        else:
            shutil.copy2(source, project / name)
    (project / "server.py").touch()
    (project / "rpc_worker.py").touch()
    python = project / ".venv" / "bin" / "python"  # what ExecStart names; systemd-analyze checks it
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    # The compiler check needs cc and c++; the dry runs that reach it never call them.
    for name, script in (("systemctl", SYSTEMCTL_STUB), ("cc", FAILING_STUB), ("c++", FAILING_STUB)):
        (stubs / name).write_text(script)
        (stubs / name).chmod(0o755)
    log = tmp_path / "systemctl.log"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LLAMA_SERVER_", "XDG_")) and key not in ("CMAKE_ARGS", "PYTHON", "CC", "CXX")}
    env.update(HOME=str(home), PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", SYSTEMCTL_LOG=str(log),
               LLAMA_SERVER_SKIP_VENV="1")
    return Installer(project.resolve(), home, env, log)


def path_without_systemctl(tmp_path: Path) -> str:
    """A PATH offering every command of the current one except ``systemctl``."""
    farm = tmp_path / "no-systemctl"
    farm.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            if entry.name != "systemctl" and not os.path.lexists(farm / entry.name):
                (farm / entry.name).symlink_to(entry.path)
    return str(farm)


def test_install_writes_unit_for_this_folder_and_starts_it(installer: Installer) -> None:
    result = installer.run()
    assert result.returncode == 0, result.stderr
    unit = installer.unit.read_text()
    assert "@PROJECT_DIR@" not in unit
    project = installer.project
    assert f"ExecStart={project}/.venv/bin/python {project}/server.py\n" in unit
    assert f"WorkingDirectory={project}\n" in unit
    assert f"EnvironmentFile=-{project}/.env\n" in unit
    assert installer.calls() == ["--user daemon-reload", f"--user try-restart {UNIT_NAME}",
                                 f"--user enable --now {UNIT_NAME}"]
    assert "http://127.0.0.1:8080" in result.stdout
    assert JOURNAL_COMMAND in result.stdout
    assert (project / ".env").read_text() == (project / ".env.example").read_text()


def test_second_run_changes_nothing_and_keeps_edited_env(installer: Installer) -> None:
    assert installer.run().returncode == 0
    before = installer.unit.stat().st_mtime_ns, installer.unit.read_text()
    env_file = installer.project / ".env"
    env_file.write_text("LLAMA_SERVER_PORT=9191\n")
    installer.log.unlink()
    result = installer.run()
    assert result.returncode == 0, result.stderr
    assert f"{installer.unit}: unchanged" in result.stdout
    assert (installer.unit.stat().st_mtime_ns, installer.unit.read_text()) == before
    assert env_file.read_text() == "LLAMA_SERVER_PORT=9191\n"
    assert installer.calls() == [f"--user enable --now {UNIT_NAME}"]
    assert "http://127.0.0.1:9191" in result.stdout


def test_changed_template_rewrites_unit_and_restarts_service(installer: Installer) -> None:
    assert installer.run().returncode == 0
    template = installer.project / UNIT_NAME
    template.write_text(template.read_text().replace("RestartSec=5", "RestartSec=7"))
    installer.log.unlink()
    result = installer.run()
    assert result.returncode == 0, result.stderr
    assert "RestartSec=7\n" in installer.unit.read_text()
    assert installer.calls() == ["--user daemon-reload", f"--user try-restart {UNIT_NAME}",
                                 f"--user enable --now {UNIT_NAME}"]


def test_url_follows_config_json_port(installer: Installer) -> None:
    config = installer.project / "config.json"
    config.write_text(config.read_text().replace('"port": 8080', '"port": 8181'))
    result = installer.run()
    assert "http://127.0.0.1:8181" in result.stdout


def test_no_service_installs_no_unit_and_calls_no_systemctl(installer: Installer) -> None:
    result = installer.run("--no-service")
    assert result.returncode == 0, result.stderr
    assert not installer.unit.exists()
    assert not installer.log.exists()
    assert "./run.sh" in result.stdout
    assert (installer.project / ".env").exists()


def test_uninstall_removes_unit_and_keeps_settings(installer: Installer) -> None:
    assert installer.run().returncode == 0
    installer.log.unlink()
    result = installer.run("--uninstall")
    assert result.returncode == 0, result.stderr
    assert not installer.unit.exists()
    assert installer.calls() == [f"--user disable --now {UNIT_NAME}", "--user daemon-reload"]
    assert (installer.project / ".env").exists()
    assert (installer.project / "config.json").exists()
    assert (installer.project / ".venv" / "bin" / "python").exists()


def test_uninstall_when_not_installed_succeeds(installer: Installer) -> None:
    result = installer.run("--uninstall")
    assert result.returncode == 0, result.stderr
    assert "not installed" in result.stdout
    assert installer.calls() == []


@pytest.mark.parametrize("systemd", ["show-environment fails", "no systemctl"])
def test_without_systemd_user_instance_explains_foreground_run(installer: Installer, tmp_path: Path,
                                                               systemd: str) -> None:
    if systemd == "no systemctl":
        result = installer.run(PATH=path_without_systemctl(tmp_path))
    else:
        result = installer.run(SYSTEMCTL_SHOW_RC="1")
    assert result.returncode == 0, result.stderr
    assert "No systemd user instance" in result.stdout
    assert f"cd {installer.project} && ./run.sh" in result.stdout
    assert "http://127.0.0.1:8080" in result.stdout
    assert not installer.unit.exists()
    assert installer.calls() == []


@pytest.mark.parametrize("args", [["--bogus"], ["extra"], ["--uninstall", "--cuda"]])
def test_bad_arguments_print_usage_and_exit_2(installer: Installer, args: list[str]) -> None:
    result = installer.run(*args)
    assert result.returncode == 2
    assert "Usage: ./install.sh" in result.stderr
    assert not installer.unit.exists()
    assert not (installer.project / ".env").exists()


def test_help_prints_usage(installer: Installer) -> None:
    result = installer.run("--help")
    assert result.returncode == 0
    assert "Usage: ./install.sh" in result.stdout
    assert "--uninstall" in result.stdout


@pytest.mark.parametrize(("flag", "cmake"), [("--cuda", "-DGGML_CUDA=on"), ("--vulkan", "-DGGML_VULKAN=on"),
                                             ("--metal", "-DGGML_METAL=on")])
def test_gpu_flag_builds_with_rpc_and_that_backend(installer: Installer, tmp_path: Path, flag: str,
                                                  cmake: str) -> None:
    shutil.rmtree(installer.project / ".venv")
    result = installer.run("--dry-run", flag, LLAMA_SERVER_SKIP_VENV="", PYTHON=sys.executable,
                           LLAMA_SERVER_WHEELS=str(tmp_path / "wheels"))
    assert result.returncode == 0, result.stderr
    assert f"would build from source into {tmp_path / 'wheels'}/0.3.36-" in result.stdout
    assert f"(CMAKE_ARGS=-DGGML_RPC=on {cmake})" in result.stdout
    assert f"would run: env CMAKE_ARGS={cmake} scripts/setup-venv.sh requirements.txt" in result.stdout
    assert not (installer.project / ".venv").exists()
    assert not (installer.project / ".env").exists()
    assert not installer.unit.exists()
    assert installer.calls() == []


def test_build_is_kept_without_flags_and_redone_with_other_ones(installer: Installer, tmp_path: Path) -> None:
    """The installed build's options are recorded; a plain run keeps them, other options rebuild,
    and a wheel built before with the same options is reused instead of compiled again."""
    wheels = tmp_path / "wheels"

    def dry_run(*args: str) -> str:
        result = installer.run("--dry-run", *args, LLAMA_SERVER_SKIP_VENV="", PYTHON=sys.executable,
                               LLAMA_SERVER_WHEELS=str(wheels))
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = dry_run()
    assert "would build from source" in out and "(CMAKE_ARGS=-DGGML_RPC=on)" in out
    key = out.split(f"{wheels}/")[1].split()[0]
    (installer.project / ".venv" / ".llama-build").write_text(key + "\n")
    (installer.project / ".venv" / ".llama-cmake-args").write_text("\n")
    assert "installed build kept (CMAKE_ARGS=-DGGML_RPC=on)" in dry_run()
    out = dry_run("--cuda")
    assert "would build from source" in out and "(CMAKE_ARGS=-DGGML_RPC=on -DGGML_CUDA=on)" in out
    cuda_key = out.split(f"{wheels}/")[1].split()[0]
    (wheels / cuda_key).mkdir(parents=True)
    (wheels / cuda_key / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").touch()
    assert "would install the cached build" in dry_run("--cuda")
    (installer.project / ".venv" / ".llama-build").write_text(cuda_key + "\n")
    (installer.project / ".venv" / ".llama-cmake-args").write_text("-DGGML_CUDA=on\n")
    assert "installed build kept (CMAKE_ARGS=-DGGML_RPC=on -DGGML_CUDA=on)" in dry_run()  # no flag: kept


def test_rpc_worker_installs_its_own_unit_and_uninstalls_it(installer: Installer) -> None:
    result = installer.run("--rpc-worker")
    assert result.returncode == 0, result.stderr
    unit = installer.rpc_unit.read_text()
    assert f"ExecStart={installer.project}/.venv/bin/python {installer.project}/rpc_worker.py\n" in unit
    assert f"EnvironmentFile=-{installer.project}/.env\n" in unit
    assert not installer.unit.exists()  # the server's unit is not this box's business
    assert installer.calls() == ["--user daemon-reload", f"--user try-restart {RPC_UNIT_NAME}",
                                 f"--user enable --now {RPC_UNIT_NAME}"]
    assert "no authentication" in result.stdout
    installer.log.unlink()
    result = installer.run("--rpc-worker", "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not installer.rpc_unit.exists()
    assert installer.calls() == [f"--user disable --now {RPC_UNIT_NAME}", "--user daemon-reload"]


def test_path_needing_unit_escapes_is_refused(installer: Installer, tmp_path: Path) -> None:
    spaced = tmp_path / "my project"
    installer.project.rename(spaced)
    installer.project = spaced
    result = installer.run()
    assert result.returncode == 1
    assert "--no-service" in result.stderr
    assert not installer.unit.exists()


def test_unit_stop_timeout_outlasts_the_drain() -> None:
    unit = (ROOT / UNIT_NAME).read_text()
    stop_timeout = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert stop_timeout is not None
    assert int(stop_timeout.group(1)) > ManagerSettings().unload_timeout
    assert "\nMemoryDenyWriteExecute=" not in unit


def test_env_example_names_only_real_settings() -> None:
    names = re.findall(r"^#? ?(LLAMA_SERVER_\w+)=", (ROOT / ".env.example").read_text(), re.MULTILINE)
    assert names
    assert set(names) <= {*ENV_KEYS, CONFIG_ENV}


def test_install_sh_parses() -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / "install.sh")], capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("rpc_worker", [False, True], ids=["server", "rpc-worker"])
def test_rendered_unit_passes_systemd_analyze_verify(installer: Installer, tmp_path: Path, rpc_worker: bool) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt install systemd)")
    assert installer.run(*(["--rpc-worker"] if rpc_worker else [])).returncode == 0
    unit = installer.rpc_unit if rpc_worker else installer.unit
    runtime = tmp_path / "runtime"  # --user needs a runtime dir; none exists without a login session
    runtime.mkdir(mode=0o700)
    env = {**installer.env, "XDG_RUNTIME_DIR": str(runtime)}
    result = subprocess.run([analyze, "--user", "verify", str(unit)], env=env, capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    if "Failed to initialize manager" in result.stderr:  # some containers refuse a user manager
        result = subprocess.run([analyze, "verify", str(unit)], env=env, capture_output=True,
                                text=True, timeout=TIMEOUT, check=False)
    # verify exits 0 on ignored bad lines and only prints them: any output is a problem.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_setup_venv_says_when_no_file_pins_llama_cpp_python(installer: Installer, tmp_path: Path) -> None:
    (installer.project / "other.txt").write_text("flask==3.1.0\n")
    result = subprocess.run([str(installer.project / "scripts" / "setup-venv.sh"), "--dry-run", "other.txt"],
                            env={**installer.env, "PYTHON": sys.executable, "LLAMA_SERVER_WHEELS": str(tmp_path)},
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 1
    assert "other.txt pin no llama-cpp-python" in result.stderr
