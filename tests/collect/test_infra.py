"""The fixtures behind the collection app's tests really work: a real PostgreSQL and a real headless Chromium."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlalchemy as sa

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>infra</title></head>
<body><p id="status">waiting</p>
<button id="go" onclick="document.getElementById('status').textContent = 'clicked'">Go</button></body></html>
"""


def test_postgres_url_is_a_fresh_database(postgres_url):
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            assert "PostgreSQL" in conn.execute(sa.text("SELECT version()")).scalar_one()
            assert conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar() == 0
            conn.execute(sa.text("CREATE TABLE votes (id serial PRIMARY KEY, prompt text NOT NULL, choice int)"))
            conn.execute(sa.text("INSERT INTO votes (prompt, choice) VALUES ('a red cube', 1), ('ünïcode', 0)"))
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT prompt, choice FROM votes ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [("a red cube", 1), ("ünïcode", 0)]
    finally:
        engine.dispose()


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


def test_browser_clicks_a_button_and_takes_a_screenshot(browser, tmp_path):
    from selenium.webdriver.common.by import By

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        assert browser.title == "infra"
        assert browser.find_element(By.ID, "status").text == "waiting"
        browser.find_element(By.ID, "go").click()
        assert browser.find_element(By.ID, "status").text == "clicked"
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.shutdown()
        server.server_close()
