"""End to end: the README's main command, `bash scripts/main.sh`, on the default dataset.

It runs the script as a user would (setup, index, one search, info, then the web server) and
checks every stage, down to the server answering and nothing being left running once stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, require_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "main.sh"
# Setup, indexing the 3,781 images and starting the server take about a minute on two cores.
STARTUP_TIMEOUT = 600.0
STOP_GRACE = 30.0
# A `lookalike search` result line: rank, score, path, then the metadata as key=value.
RESULT = re.compile(r"^\s*\d+\s+-?\d+\.\d+\s+(\S+)(.*)$")


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, dead but not yet reaped, do not)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after its ')'.
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # the process ended while we looked
        if int(pgrp) == pgid and state not in {"Z", "X"}:
            return True
    return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the script's process group, SIGKILL to what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        process.poll()
        if not group_alive(process.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and group_alive(process.pid):
            process.poll()  # reap the script itself; its orphaned children go to init
            time.sleep(0.2)
    process.wait(timeout=STOP_GRACE)


def wait_for_health(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:]
            pytest.fail(f"main.sh exited with status {process.returncode} before serving:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"no answer from {url}/health within {STARTUP_TIMEOUT:.0f}s")


@pytest.mark.dataset
@pytest.mark.slow
def test_main_script_indexes_searches_and_serves_the_default_dataset(tmp_path: Path) -> None:
    dataset = require_dataset().resolve()
    images = sum(1 for p in dataset.rglob("*") if p.suffix.lower() in {".jpg", ".png"})
    collection = tmp_path / "collection"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "LOOKALIKE_COLLECTION": str(collection),
        "LOOKALIKE_HOME": str(tmp_path / "home"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    log = tmp_path / "main.log"
    # Output goes to a file, so a long log can never block the script on a full pipe.
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", str(SCRIPT)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_health(process, url, log)
        # search and info have exited by now, so their output is flushed to the log.
        lines = log.read_text(errors="replace").splitlines()
        queries = [line.removeprefix("query: ") for line in lines if line.startswith("query: ")]
        assert len(queries) == 1, lines[-40:]
        query = (ROOT / queries[0]).resolve()
        assert query.is_relative_to(dataset) and query.is_file()
        results = [m for line in lines if (m := RESULT.match(line))]
        assert 1 <= len(results) <= 5, lines[-40:]
        paths = [Path(m.group(1)) for m in results]
        assert all(path.is_relative_to(dataset) and path.is_file() for path in paths), paths
        assert query in paths  # the query image is itself in the collection
        assert all("label=" in m.group(2) for m in results)  # labels.csv became metadata
        assert f"collection: {collection}" in lines
        assert f"images:     {images}" in lines
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "<title>lookalike</title>" in page.text
    finally:
        stop(process)
    assert process.returncode is not None
    assert not group_alive(process.pid), "processes of main.sh are still running"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
