"""A real PostgreSQL server and a real headless Chromium for the collection app's tests.

Both come from Debian packages that `make tools` installs (scripts/install-test-tools.sh); without them the tests
that use these fixtures are skipped. Nothing here touches a system PostgreSQL service or downloads a browser.
"""

from __future__ import annotations

import asyncio
import glob
import html
import http.cookiejar
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pickscore.collect.app import CollectApp, CollectSettings

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # needed as root (CI) and in containers without user namespaces
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers crashes the renderer
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
MISSING_TOOLS = "run `make tools` (scripts/install-test-tools.sh) to install them"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The newest Debian /usr/lib/postgresql/<version>/bin with the server's programs, else the one on PATH."""
    needed = ("initdb", "pg_ctl", "postgres")
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: _version(Path(d).parent.name), reverse=True)
    for d in dirs:
        if all(os.access(Path(d, name), os.X_OK) for name in needed):
            return Path(d)
    found = [shutil.which(name) for name in needed]
    if all(found) and len({Path(f).parent for f in found}) == 1:
        return Path(found[0]).parent
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


@dataclass(frozen=True)
class PostgresServer:
    host: str  # 127.0.0.1; the unix socket is in socket_dir
    port: int
    user: str  # a superuser, trust authentication: no password
    socket_dir: Path
    data_dir: Path

    def url(self, database: str) -> str:
        """An SQLAlchemy URL for ``database`` on this server (TCP, psycopg 3)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=database, **kwargs)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL for the session: trust auth for ``postgres``, 127.0.0.1 on a free port, no fsync."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(f"no PostgreSQL server programs (initdb, pg_ctl, postgres): {MISSING_TOOLS}")
    as_root = os.geteuid() == 0
    if as_root:
        # initdb and postgres refuse to run as root: run them as Debian's `postgres` system user, in a directory
        # of its own that it can reach (pytest's base temporary directory is private to root).
        if shutil.which("runuser") is None:
            pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
        try:
            import pwd

            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"running as root needs the `postgres` system user: {MISSING_TOOLS}")
        base = Path(tempfile.mkdtemp(prefix="pickscore-pg-"))
        os.chown(base, pg_user.pw_uid, pg_user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    else:
        base = tmp_path_factory.mktemp("postgres")
        prefix = []
    data, sockets, log = base / "data", base / "sockets", base / "postgres.log"

    def run(*args: str | Path) -> None:
        cmd = [*prefix, *map(str, args)]
        done = subprocess.run(cmd, cwd=base, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            logged = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{logged}")

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        run("mkdir", "-m", "700", sockets)
        for attempt in range(3):
            port = free_port()
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": port,
                "unix_socket_directories": f"'{sockets}'",
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
                "max_connections": 50,
            }
            with open(data / "postgresql.auto.conf", "a") as conf:  # the last setting of each name wins
                conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
            try:
                run(bin_dir / "pg_ctl", "start", "-D", data, "-l", log, "-w", "-t", "60")
                break
            except RuntimeError:
                if attempt == 2:  # the port was taken between free_port() and the bind, three times over
                    raise
        yield PostgresServer(host="127.0.0.1", port=port, user="postgres", socket_dir=sockets, data_dir=data)
        run(bin_dir / "pg_ctl", "stop", "-D", data, "-m", "immediate", "-w")
    finally:
        if as_root:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """An SQLAlchemy URL (postgresql+psycopg://...) of a fresh, empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    with postgres_server.connect(autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield postgres_server.url(name)
    with postgres_server.connect(autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A headless Chromium (Debian's, through its chromedriver) driven by Selenium; 1280x900, a fresh profile."""
    chromium = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    driver = CHROMEDRIVER if os.access(CHROMEDRIVER, os.X_OK) else shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(f"no chromium and chromium-driver: {MISSING_TOOLS}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in [*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        chrome.set_page_load_timeout(30)
        yield chrome
    finally:
        chrome.quit()


# The app itself, on loopback --------------------------------------------------------------------------------


class AppThread:
    """A ``CollectApp`` serving on 127.0.0.1 from its own event loop in a thread (as `pickscore collect` does)."""

    def __init__(self, settings, source=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = self.run(_build(settings, source))
        self.run(self.app.start())
        self.url = f"http://127.0.0.1:{self.app.port}"
        self.store = self.app.store

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        self.run(self.app.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def _build(settings, source) -> CollectApp:
    return CollectApp(settings, source=source)  # on the loop: an --order-server client's channel belongs to it


@pytest.fixture
def start_app():
    """start_app(db=URL, candidates=..., **settings) -> AppThread; every app started is stopped afterwards."""
    started: list[AppThread] = []

    def start(source=None, **settings) -> AppThread:
        settings.setdefault("port", 0)
        app = AppThread(CollectSettings(**settings), source)
        started.append(app)
        return app

    yield start
    for app in started:
        app.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh database of each kind: a SQLite file, and a new database on the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'collect.db'}"
    return request.getfixturevalue("postgres_url")


class Visitor:
    """One person's browser without the browser: a cookie jar, forms posted as the pages would post them."""

    def __init__(self, base: str):
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.status, self.body = 0, ""

    def get(self, path: str = "/") -> str:
        return self._open(path, None)

    def post(self, path: str, **form) -> str:
        if "csrf" not in form and self.csrf:
            form["csrf"] = self.csrf
        return self._open(path, urllib.parse.urlencode(form).encode())

    def _open(self, path: str, data: bytes | None) -> str:
        try:
            with self.opener.open(self.base + path, data, timeout=60) as response:
                self.status, self.body = response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            self.status, self.body = e.code, e.read().decode()
        return self.body

    def _field(self, name: str) -> str | None:
        found = re.search(rf'name="{name}" value="([^"]*)"', self.body)
        return found and found.group(1)

    @property
    def csrf(self) -> str | None:
        return self._field("csrf")

    @property
    def error(self) -> str | None:
        found = re.search(r'id="error"[^>]*>([^<]*)<', self.body)
        return found and html.unescape(found.group(1))

    @property
    def pair(self) -> dict | None:
        """The pair on the page: its id and the two image ids, as the choice form holds them."""
        if self._field("pair") is None:
            return None
        return {"pair": int(self._field("pair")), "image_0": self._field("image_0"), "image_1": self._field("image_1")}

    def sign_in(self, name: str, consent: bool = True, **form) -> str:
        self.get("/signin")
        return self.post("/signin", name=name, **({"consent": "yes"} if consent else {}), **form)

    def choose(self, label: str, **override) -> str:
        return self.post("/choose", **{**(self.pair or {}), "choice": label, **override})
