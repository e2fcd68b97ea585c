"""`prefcli label serve` in a real browser: Debian's Chromium, headless, driven by Selenium through
chromedriver. A rater opens their link, labels by keyboard, types ahead (dropped), undoes, reloads, loses
the network and gets it back (the answer is retried and recorded once), sees the XSS item as text; on a
narrow window the candidates stack; the owner's dashboard shows the agreement the krippendorff package gives.

Screenshots of both pages go to the test's folder, and to $PREFCLI_SCREENSHOTS when set (docs/img/ holds
the ones docs/labelling.md shows: `PREFCLI_SCREENSHOTS=docs/img pytest tests/test_label_browser.py`).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="pip install 'prefcli[label]'")
krippendorff = pytest.importorskip("krippendorff", reason="pip install 'prefcli[label]'")
pytest.importorskip("selenium", reason="pip install selenium (the dev extra)")

from .label_tasks import live_server, make_task  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Chromium and its WebDriver: apt-get install chromium chromium-driver (Debian, Ubuntu)",
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-default-apps",
        "--disable-extensions",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,860",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def answers(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(
            "SELECT r.name, a.item_id, a.answer FROM answers a JOIN raters r ON r.id = a.rater_id "
            "WHERE a.undone_at IS NULL ORDER BY a.id"
        ).fetchall()


def wait(cond, timeout=10.0, what="the page"):
    from selenium.common.exceptions import WebDriverException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = cond()
        except WebDriverException:  # the page was replaced while it was read: look again
            v = None
        if v:
            return v
        time.sleep(0.03)
    raise AssertionError(f"timed out waiting for {what}")


def current(driver) -> str | None:
    from selenium.common.exceptions import NoSuchElementException, WebDriverException

    for _ in range(50):
        try:
            return driver.find_element("id", "item").get_attribute("data-assignment")
        except NoSuchElementException:
            return None
        except WebDriverException:  # the page was replaced while it was read (stale node): look again
            time.sleep(0.02)
    return None


def key_for(driver) -> str:
    """What this rater answers: the candidate ending 'saith the LORD.' is better."""
    texts = [e.text for e in driver.find_elements("css selector", ".cand pre")]
    return "a" if "saith the LORD" in texts[0] else "b"


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


SEEN: list[str] = []  # the prompts the rater answered, as the page showed them


def answer_by_key(driver, db, keys=None) -> str:
    before, n = current(driver), len(answers(db))
    SEEN.append(driver.find_element("css selector", ".prompt").text)
    assert driver.title != "pwned" and driver.find_elements("css selector", ".cand img, .prompt script") == []
    press(driver, keys or key_for(driver))
    wait(
        lambda: (
            current(driver) != before
            and len(answers(db)) == n + 1
            and driver.execute_script("return document.readyState") == "complete"
        ),
        what="the next item",
    )
    return before


def save(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("PREFCLI_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["PREFCLI_SCREENSHOTS"]) / name)


@pytest.mark.slow
def test_a_rater_labels_by_keyboard_and_the_owner_sees_agreement(tmp_path, browser):
    SEEN.clear()
    task = make_task(tmp_path, gold=None)
    db = tmp_path / "task.db"
    with live_server(task) as (store, url):
        ann, bob, owner = store.invite("ann")[0], store.invite("bob")[0], store.owner_token()
        d = browser
        d.get(f"{url}/r/{ann}")
        assert d.current_url == f"{url}/label" and current(d)
        save(d, tmp_path, "label-rater.png")
        # on a phone-sized window the candidates stack
        d.set_window_size(420, 900)
        a, b = d.find_elements("css selector", ".cand")[:2]
        assert b.location["y"] >= a.location["y"] + a.size["height"] and a.location["x"] == b.location["x"]
        save(d, tmp_path, "label-rater-narrow.png")
        d.set_window_size(1280, 860)
        done = [answer_by_key(d, db) for _ in range(3)]
        # type-ahead: 'a' then 'b' at once; the 'b' arrives while the answer is on its way and is dropped
        fourth = answer_by_key(d, db, keys=key_for(d) + ("b" if key_for(d) == "a" else "a"))
        time.sleep(0.3)
        assert len(answers(db)) == 4, "a key typed ahead answered an item that was not on screen"
        fifth = answer_by_key(d, db)
        assert [r[0] for r in answers(db)] == ["ann"] * 5
        # undo: the fifth item comes back; a reload shows the same item again
        press(d, "u")
        wait(lambda: current(d) == fifth and len(answers(db)) == 4, what="the undone item")
        d.refresh()
        assert current(d) == fifth
        # the network goes away: the answer waits, is retried, and is recorded once
        d.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
        press(d, key_for(d))
        wait(lambda: "Not saved yet" in d.find_element("id", "status").text, what="the offline notice")
        assert len(answers(db)) == 4
        d.set_network_conditions(offline=False, latency=0, download_throughput=-1, upload_throughput=-1)
        wait(lambda: len(answers(db)) == 5 and current(d) not in (None, fifth), timeout=20, what="the retry")
        assert len(answers(db)) == 5 and len({r[1] for r in answers(db)}) == 5
        while current(d):  # the rest
            answer_by_key(d, db)
        # the XSS item was shown as text (answer_by_key checks that no element was injected, no script ran)
        assert "<script>document.title='pwned'</script>And the LORD spake" in SEEN and d.title != "pwned"
        assert "every item you can" in d.find_element("tag name", "h1").text
        assert len(answers(db)) == 13 and done[0] and fourth
        # bob answers every item "A" through the JSON API, as a script would
        import httpx

        h = {"Authorization": f"Bearer {bob}"}
        while True:
            r = httpx.get(f"{url}/api/next", headers=h).json()
            if r.get("done"):
                break
            httpx.post(f"{url}/api/answer", headers=h, json={"assignment": r["assignment"], "answer": "A"})
        # the owner's dashboard shows the agreement the krippendorff package computes from the stored answers
        d.get(f"{url}/owner/{owner}")
        assert d.current_url == f"{url}/dashboard"
        d.set_window_size(1280, 1150)
        assert "13 / 13 items complete" in d.find_element("tag name", "header").text
        save(d, tmp_path, "label-dashboard.png")
        with sqlite3.connect(db) as c:
            rows = c.execute("SELECT rater_id, item_id, choice FROM answers WHERE undone_at IS NULL").fetchall()
            texts = dict(c.execute("SELECT id, candidates FROM items").fetchall())
        import json

        raters, items = sorted({r for r, _, _ in rows}), sorted({i for _, i, _ in rows})
        import numpy as np

        data = np.full((len(raters), len(items)), np.nan)
        for r, i, choice in rows:
            c = json.loads(choice)
            if c in (0, 1):  # the label data inspect gives: which completion won, in text order
                cands = json.loads(texts[i])
                data[raters.index(r), items.index(i)] = float(cands[c] > cands[1 - c])
        want = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
        assert d.find_element("id", "alpha").text == f"{want:.2f}"
        assert "ann" in d.find_element("id", "raters").text and "bob" in d.find_element("id", "raters").text
