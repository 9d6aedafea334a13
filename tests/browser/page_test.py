#!/usr/bin/env python3
"""Drives the built-in web page in headless Chromium: upload one image with the fast model,
wait for the before/after slider, check the result's size and download link, move the
slider with the keyboard and save a screenshot.

With --cancel-queued (the server's worker must be busy with another task): the upload waits
in the queue, the row says its place, and its Cancel button ends it as cancelled.

    python page_test.py --base-url http://127.0.0.1:8080 --image small.png --out-dir out [--token T]
                        [--cancel-queued]

Needs Debian's chromium and chromedriver (/usr/bin); never downloads a driver.
"""
import argparse
import base64
import hashlib
import os
import shutil
import sys
import tempfile
import time
import traceback
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

FAST_MODEL = "realesr-animevideov3"

ROW_STATE = """
const row = document.querySelector(`#queue .job[data-file-name="${CSS.escape(arguments[0])}"]`);
if (!row) return null;
const b = row.querySelector('img.before'), a = row.querySelector('img.after');
return {state: row.dataset.state, message: row.querySelector('.message').textContent,
        loaded: !!(b && a && b.complete && a.complete && a.naturalWidth > 0),
        before: b ? [b.naturalWidth, b.naturalHeight] : null,
        after: a ? [a.naturalWidth, a.naturalHeight] : null};
"""

CLICK_OVERWRITE = """
const row = document.querySelector(`#queue .job[data-file-name="${CSS.escape(arguments[0])}"]`);
[...row.querySelectorAll('.actions button')].find(b => /overwrite/i.test(b.textContent)).click();
"""

# Reads the download link's blob URL in the page; answers base64 (crypto.subtle would need
# a secure context, which a non-localhost base URL is not).
FETCH_LINK = """
const done = arguments[arguments.length - 1];
const a = document.querySelector(`#queue .job[data-file-name="${CSS.escape(arguments[0])}"] a.download`);
fetch(a.href).then(r => r.blob()).then(b => {
  const fr = new FileReader();
  fr.onload = () => done({ok: fr.result.split(',')[1], download: a.getAttribute('download')});
  fr.readAsDataURL(b);
}).catch(e => done({error: String(e)}));
"""


def start_browser(profile_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1400",
                 f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager is never used.
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


CLICK_CANCEL = """
const row = document.querySelector(`#queue .job[data-file-name="${CSS.escape(arguments[0])}"]`);
const b = [...row.querySelectorAll('.actions button')].find(b => b.textContent === 'Cancel');
if (!b) return false;
b.click();
return true;
"""


def wait_row(driver, name, ok, what, seconds=60):
    """Polls the row of `name` until `ok(row)`; fails on an error state or after `seconds`."""
    deadline = time.monotonic() + seconds
    row = None
    while time.monotonic() < deadline:
        row = driver.execute_script(ROW_STATE, name)
        if row and ok(row):
            return row
        if row and row["state"] in ("failed", "error", "auth"):
            raise AssertionError(f"job ended in state {row['state']}: {row['message']}")
        time.sleep(0.1)
    raise AssertionError(f"{what} within {seconds} s; last row state: {row}")


def cancel_queued(driver, name):
    row = wait_row(driver, name, lambda r: r["state"] == "queued" and "in the queue" in r["message"],
                   "the upload never waited in the queue with its place")
    print(f"queued: {row['message']}")
    assert "number 1 in the queue" in row["message"], row["message"]
    assert driver.execute_script(CLICK_CANCEL, name), "no Cancel button on the queued row"
    row = wait_row(driver, name, lambda r: r["state"] == "cancelled", "the row never showed the cancellation")
    print(f"cancelled: {row['message']}")
    assert "nothing was stored" in row["message"], row["message"]
    buttons = driver.execute_script(
        "return [...document.querySelectorAll(`#queue .job[data-file-name=\"${CSS.escape(arguments[0])}\"] "
        ".actions button`)].map(b => b.textContent)", name)
    assert buttons == ["Upload again"], f"buttons after cancelling: {buttons}"


def run(driver, args):
    base = args.base_url.rstrip("/")
    name = os.path.basename(args.image)
    driver.set_script_timeout(60)
    driver.get(base + "/")
    if args.token:
        # The token field is shown only once the server answers 401; entered there, it is
        # kept in sessionStorage and the model list loads.
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "token").is_displayed(),
                                        message="the token field never appeared")
        driver.find_element(By.ID, "token").send_keys(args.token)
        driver.find_element(By.ID, "use-token").click()
        WebDriverWait(driver, 30).until(lambda d: not d.find_element(By.ID, "auth").is_displayed(),
                                        message="the token was not accepted")
        print("the token field appeared on 401 and the token was accepted")

    try:
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#model option')].some(o => o.value === arguments[0])"
            " && !document.querySelector('#model').disabled", FAST_MODEL))
    except TimeoutException:
        says = driver.execute_script(
            "return ['#model-desc', '#status'].map(s => document.querySelector(s).textContent).join(' / ')")
        raise AssertionError(f"the model list was not filled with {FAST_MODEL}; the page says: {says}") from None
    # Loaded without a token when none is needed: the token field stays hidden.
    assert not driver.find_element(By.ID, "auth").is_displayed(), "the token field is shown"
    Select(driver.find_element(By.ID, "model")).select_by_value(FAST_MODEL)
    driver.find_element(By.ID, "file-input").send_keys(os.path.abspath(args.image))
    if args.cancel_queued:
        cancel_queued(driver, name)
        os.makedirs(args.out_dir, exist_ok=True)
        shot = os.path.abspath(os.path.join(args.out_dir, "page-cancelled.png"))
        driver.save_screenshot(shot)
        print(f"screenshot: {shot}")
        check_console(driver)
        return

    deadline = time.monotonic() + 120
    row, overwritten = None, False
    while time.monotonic() < deadline:
        row = driver.execute_script(ROW_STATE, name)
        if row and row["state"] == "success" and row["loaded"]:
            break
        if row and row["state"] == "choice" and not overwritten:
            # Stored by an earlier run: "Process again (overwrite)" / "Overwrite".
            print(f"already stored: {row['message']} Asking to overwrite.")
            driver.execute_script(CLICK_OVERWRITE, name)
            overwritten = True
            time.sleep(0.5)
            continue
        if row and row["state"] in ("failed", "error", "choice", "auth"):
            raise AssertionError(f"job ended in state {row['state']}: {row['message']}")
        time.sleep(0.25)
    else:
        raise AssertionError(f"no result within 120 s; last row state: {row}")
    (bw, bh), (aw, ah) = row["before"], row["after"]
    print(f"before {bw}x{bh}, after {aw}x{ah}: {row['message']}")
    assert (aw, ah) == (4 * bw, 4 * bh), f"after is {aw}x{ah}, expected {4 * bw}x{4 * bh}"

    link = driver.execute_async_script(FETCH_LINK, name)
    assert "ok" in link, f"the download link could not be read: {link}"
    in_page = hashlib.sha256(base64.b64decode(link["ok"])).hexdigest()
    req = urllib.request.Request(f"{base}/processed/{urllib.parse.quote(name, safe='')}")
    if args.token:
        req.add_header("Authorization", f"Bearer {args.token}")
    with urllib.request.urlopen(req, timeout=30) as res:
        served = hashlib.sha256(res.read()).hexdigest()
    assert in_page == served, f"download link sha256 {in_page} != /processed sha256 {served}"
    stem = os.path.splitext(name)[0]
    assert link["download"] == f"{stem}_x4.png", f"download name is {link['download']!r}"
    print(f"download link {link['download']} matches /processed/{name} (sha256 {served[:16]}…)")

    job = driver.find_element(By.CSS_SELECTOR, f'#queue .job[data-file-name="{name}"]')
    slider = job.find_element(By.CSS_SELECTOR, "input[type=range]")
    before_value = slider.get_attribute("value")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].focus()", slider)
    slider.send_keys(Keys.ARROW_LEFT * 5)
    after_value = slider.get_attribute("value")
    assert after_value != before_value, f"slider value stayed {before_value}"
    print(f"slider moved with the keyboard: {before_value} -> {after_value}")

    os.makedirs(args.out_dir, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")  # the whole page: options, queue, slider
    shot = os.path.abspath(os.path.join(args.out_dir, "page.png"))
    driver.save_screenshot(shot)
    print(f"screenshot: {shot}")

    check_console(driver)


def check_console(driver):
    # Script errors only: refused requests show up in the flow above already.
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE" and e.get("source") != "network"]
    assert not errors, f"errors in the browser console: {errors}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--image", required=True, help="a small PNG")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--token", default=os.environ.get("UPSCALER_TOKEN"))
    ap.add_argument("--cancel-queued", action="store_true",
                    help="cancel the upload while it waits behind another task")
    args = ap.parse_args()

    profile = tempfile.mkdtemp(prefix="page-test-chromium-")
    driver = None
    try:
        driver = start_browser(profile)
        run(driver, args)
        print("PASS")
        return 0
    except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
        print(f"FAIL: {exc}", file=sys.stderr)
        traceback.print_exc()
        if driver is not None:
            try:
                for entry in driver.get_log("browser"):
                    print(f"console {entry.get('level')}: {entry.get('message')}", file=sys.stderr)
            except Exception:  # noqa: BLE001
                pass
        return 1
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
