"""The collection app in a real browser (headless Chromium through Selenium) against a real app and database.

A person signs in, writes a prompt and chooses with the mouse and with the arrow keys; every choice must land in
the database exactly as the page showed it, and the rejected image (both, on a tie) must be replaced on screen.

PICKSCORE_SCREENSHOTS=1 also writes the choice page to docs/collect-choice.png (the README's picture).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "collect-choice.png"
NAME = "Ada Browser"
PROMPT = "a lighthouse on a rocky island at dusk"
WAIT_S = 30

# The pair the choice form carries, read in one go (null when the page has no pair), with whether the page and
# both images have finished loading.
READ_PAIR = """
const form = document.getElementById("choice-form");
if (!form) return null;
const value = (name) => form.querySelector(`input[name="${name}"]`).value;
const loaded = (id) => { const img = document.getElementById(id); return img.complete && img.naturalWidth > 0; };
return {
  pair: parseInt(value("pair"), 10),
  image_0: value("image_0"),
  image_1: value("image_1"),
  src_0: document.getElementById("image-left").getAttribute("src"),
  src_1: document.getElementById("image-right").getAttribute("src"),
  prompt: document.getElementById("shown-prompt").textContent,
  ready: document.readyState === "complete" && loaded("image-left") && loaded("image-right"),
};
"""


def _wait(browser):
    from selenium.common.exceptions import JavascriptException, NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (JavascriptException, NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(browser, WAIT_S, poll_frequency=0.05, ignored_exceptions=ignored)


def shown_pair(browser) -> dict | None:
    """The pair on the page (ids and image sources), once the page and both images have loaded."""
    pair = browser.execute_script(READ_PAIR)
    if pair is None or not pair["ready"]:
        return None
    del pair["ready"]
    return pair


def wait_for_pair(browser, after: int | None = None) -> dict:
    """Wait until the page shows a fully loaded pair other than ``after``; that pair."""

    def new_pair(driver):
        pair = shown_pair(driver)
        return pair if pair is not None and pair["pair"] != after else False

    return _wait(browser).until(new_pair, f"no pair after pair {after} within {WAIT_S}s")


def sign_in_and_prompt(browser, url: str) -> dict:
    """Open the app (redirected to sign-in), sign in with the consent box ticked, write a prompt: the first pair."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    browser.get(url + "/")
    _wait(browser).until(EC.url_to_be(url + "/signin"))
    assert browser.find_element(By.ID, "consent").text.startswith("This app records the choices")
    browser.find_element(By.ID, "name").send_keys(NAME)
    consent = browser.find_element(By.ID, "consent-box")
    consent.click()
    assert consent.is_selected()
    browser.find_element(By.ID, "signin-button").click()

    prompt = _wait(browser).until(EC.element_to_be_clickable((By.ID, "prompt")))
    assert browser.current_url == url + "/"
    assert browser.find_element(By.ID, "no-pair").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, "header .who").text == NAME
    prompt.clear()
    prompt.send_keys(PROMPT)
    browser.find_element(By.ID, "new-prompt").click()
    return wait_for_pair(browser)


def press(browser, key: str) -> None:
    """Send one key to the page itself (its body has the focus, not the prompt input), as a person would."""
    from selenium.webdriver.common.action_chains import ActionChains

    assert browser.execute_script("return document.activeElement.tagName") == "BODY"
    ActionChains(browser).send_keys(key).perform()


def click(browser, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, element_id).click()


def count_choices(app) -> int:
    with app.store.engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM choices")).scalar_one()


def test_choices_in_a_real_browser_land_in_the_database(browser, start_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app = start_app(db=f"sqlite:///{tmp_path / 'collect.db'}", candidates="synthetic", seed=1234, image_size=256)
    browser.set_window_size(1280, 1000)
    pair = sign_in_and_prompt(browser, app.url)
    assert pair["prompt"] == PROMPT
    assert (pair["src_0"], pair["src_1"]) == (f"/image/{pair['image_0']}", f"/image/{pair['image_1']}")
    assert pair["image_0"] != pair["image_1"]

    # A screenshot of the choice page: both candidates in view, with the buttons and the prompt.
    for element_id in ("image-left", "image-right", "choose-tie", "prompt"):
        assert browser.find_element(By.ID, element_id).is_displayed()
    in_view = "const r = arguments[0].getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight;"
    for element_id in ("image-left", "image-right"):
        assert browser.execute_script(in_view, browser.find_element(By.ID, element_id)), f"{element_id} not in view"
    shot = tmp_path / "collect-choice.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get("PICKSCORE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT.write_bytes(data)

    # An arrow key typed into the prompt input moves its caret; it chooses nothing.
    browser.execute_script(
        "window.__marker = true; window.__submitted = false;"
        "document.addEventListener('submit', () => { window.__submitted = true; }, true);"
    )
    prompt = browser.find_element(By.ID, "prompt")
    prompt.click()
    assert browser.execute_script("return document.activeElement.id") == "prompt"
    prompt.send_keys(Keys.END, Keys.ARROW_LEFT)
    unsent = "return window.__marker === true && window.__submitted === false"  # false once a form was sent
    assert browser.execute_script(unsent), "ArrowLeft in the prompt input sent a form"
    prompt.send_keys("!")
    assert prompt.get_attribute("value") == PROMPT[:-1] + "!" + PROMPT[-1]  # the key moved the caret
    assert browser.execute_script(unsent) and shown_pair(browser) == pair
    assert count_choices(app) == 0

    steps = [
        ("left", lambda: click(browser, "choose-left")),
        ("right", lambda: press(browser, Keys.ARROW_RIGHT)),
        ("tie", lambda: press(browser, Keys.ARROW_DOWN)),
        ("tie", lambda: click(browser, "choose-tie")),
        ("left", lambda: press(browser, Keys.ARROW_LEFT)),
        ("right", lambda: click(browser, "choose-right")),
    ]
    made = []
    for label, act in steps:
        act()
        after = wait_for_pair(browser, after=pair["pair"])
        made.append((label, pair))
        assert after["pair"] > pair["pair"] and after["prompt"] == PROMPT
        old, new = (pair["image_0"], pair["image_1"]), (after["image_0"], after["image_1"])
        if label == "left":  # the winner stays on its side; the rejected one is replaced
            assert new[0] == old[0] and new[1] not in old, (label, old, new)
        elif label == "right":
            assert new[1] == old[1] and new[0] not in old, (label, old, new)
        else:
            assert not set(new) & set(old), (label, old, new)
        assert new[0] != new[1]
        pair = after

    query = sa.text(
        "SELECT c.label, c.pair_id, p.image_0, p.image_1, p.prompt, u.name FROM choices c "
        "JOIN pairs p ON p.id = c.pair_id JOIN users u ON u.id = c.user_id ORDER BY c.id"
    )
    with app.store.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(query)]
        newest = conn.execute(sa.text("SELECT id, image_0, image_1 FROM pairs ORDER BY id DESC LIMIT 1")).one()
        user_id = conn.execute(sa.text("SELECT id FROM users WHERE name = :name"), {"name": NAME}).scalar_one()
    expected = [(label, p["pair"], p["image_0"], p["image_1"], PROMPT, NAME) for label, p in made]
    assert rows == expected
    assert tuple(newest) == (pair["pair"], pair["image_0"], pair["image_1"])  # what the page shows now
    assert app.store.current(user_id).id == pair["pair"]  # and it is unanswered


def test_choice_page_fits_a_phone(browser, start_app, tmp_path):
    from selenium.webdriver.common.by import By

    app = start_app(db=f"sqlite:///{tmp_path / 'collect.db'}", candidates="synthetic", seed=99)
    browser.set_window_size(390, 844)
    sign_in_and_prompt(browser, app.url)
    browser.refresh()  # the choice page as first loaded at this width
    wait_for_pair(browser)
    width = browser.execute_script("return window.innerWidth")
    if width > 420:
        pytest.fail(f"the window did not shrink to a phone's width (innerWidth {width})")

    left = browser.find_element(By.ID, "choose-left").rect
    right = browser.find_element(By.ID, "choose-right").rect
    assert left["y"] + left["height"] <= right["y"], (left, right)  # stacked: right below left
    assert left["x"] == right["x"] and left["width"] == right["width"], (left, right)
    assert left["x"] >= 0 and left["x"] + left["width"] <= width, (left, width)
    # Nothing wider than the window: no sideways scrolling (clientWidth is innerWidth less a vertical scrollbar).
    scroll_width, client_width = browser.execute_script(
        "const root = document.documentElement; return [root.scrollWidth, root.clientWidth];"
    )
    assert scroll_width <= client_width <= width, f"the page is {scroll_width}px wide in a {width}px window"
