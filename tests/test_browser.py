"""The web page in a real browser: Playwright driving Debian's Chromium, headless."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from helpers import png, quiet, running_server, small_config, untrained_run  # noqa: E402

from fmnist.data import load_split  # noqa: E402
from fmnist.inference.predictor import load_model  # noqa: E402

CHROMIUM = os.environ.get("FMNIST_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's pages (Playwright's sync API runs one at a time)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, trained_run):
    with running_server(trained_run) as (host, port, _):
        page = browser.new_page()
        external = []  # requests leaving the service: a CDN, fonts...

        def record(request):
            if request.url.startswith(("http:", "https:")) and not request.url.startswith(f"http://{host}:{port}/"):
                external.append(request.url)

        page.on("request", record)
        page.goto(f"http://{host}:{port}/")
        page.external_requests = external
        yield page
        page.close()


def confident_test_image(trained_run, data_dir) -> tuple[np.ndarray, str]:
    """A test image the model classifies correctly with high probability, and its class."""
    images, labels = load_split("test", data_dir)
    predictor = load_model(trained_run)
    probabilities = predictor.probabilities(images[:200])
    best = int(np.argmax(probabilities[np.arange(200), labels[:200]]))
    return images[best], predictor.class_names[labels[best]]


def test_upload_shows_prediction_and_model_input(page, trained_run, data_dir, tmp_path):
    image, label = confident_test_image(trained_run, data_dir)
    path = tmp_path / "item.png"
    path.write_bytes(png(255 - image))  # as a photo: dark object on white
    page.set_input_files("#file-input", str(path))
    sync_api.expect(page.locator("#status")).to_have_text(f"item.png: {label}", timeout=20_000)
    assert page.locator("#predictions li").count() == 5
    assert page.locator("#predictions li .label").first.inner_text() == label
    assert page.get_attribute("#model-input", "src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('model-input').naturalWidth") == 28
    assert page.external_requests == []


def test_upload_shows_the_heatmap_beside_the_bars(page, trained_run, data_dir, tmp_path):
    pytest.importorskip("captum")
    image, label = confident_test_image(trained_run, data_dir)
    path = tmp_path / "garment.png"
    path.write_bytes(png(255 - image))
    page.set_input_files("#file-input", str(path))
    sync_api.expect(page.locator("#status")).to_have_text(f"garment.png: {label}", timeout=20_000)
    sync_api.expect(page.locator("#explanation")).to_be_visible(timeout=30_000)
    assert page.get_attribute("#explanation", "src").startswith("data:image/png;base64,")
    assert page.evaluate("document.getElementById('explanation').naturalWidth") == 28
    assert page.locator("#explanation-caption").inner_text().startswith(f"What the model looked at for {label}")
    overlay, bars = page.locator("#explanation").bounding_box(), page.locator("#predictions").bounding_box()
    assert overlay["x"] >= bars["x"] + bars["width"] - 1  # beside the bars, on their right
    assert overlay["y"] < bars["y"] + bars["height"]
    assert page.external_requests == []


def test_drawing_is_classified(page):
    page.click("#clear")
    box = page.locator("#draw").bounding_box()
    page.mouse.move(box["x"] + 80, box["y"] + 40)
    page.mouse.down()
    for x, y in [(80, 240), (200, 240), (200, 40)]:  # a rough U: something like trousers
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
    page.mouse.up()
    page.click("#classify-drawing")
    # A line drawing is classified, and may well be called unlike the training images: it is.
    answered = re.compile(r"^drawing\.png(: | does not look like clothing)")
    sync_api.expect(page.locator("#status")).to_have_text(answered, timeout=20_000)
    assert page.locator("#predictions li").count() == 5


def test_bad_file_shows_the_error(page, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    page.set_input_files("#file-input", str(path))
    sync_api.expect(page.locator("#status")).to_contain_text("Error 415", timeout=20_000)
    assert page.locator("#predictions li").count() == 0
    assert page.locator("#explanation-box").is_hidden()  # no heatmap of an earlier picture


def test_a_picture_that_is_not_clothing_is_called_so(page, tmp_path):
    from PIL import Image, ImageDraw

    face = Image.new("RGB", (300, 300), "white")  # a smiley, drawn dark on white like a photo
    draw = ImageDraw.Draw(face)
    draw.ellipse([30, 30, 270, 270], outline="black", width=12)
    for x in (95, 175):
        draw.ellipse([x, 100, x + 30, 130], fill="black")
    draw.arc([90, 140, 210, 230], 20, 160, fill="black", width=12)
    path = tmp_path / "face.png"
    face.save(path)
    page.set_input_files("#file-input", str(path))
    status = page.locator("#status")
    sync_api.expect(status).to_contain_text("face.png does not look like clothing", timeout=20_000)
    assert "error" in status.get_attribute("class")
    assert "doubtful" in page.get_attribute("#predictions", "class")
    assert page.locator("#predictions li").count() == 5  # the guess is still shown, greyed


# ----------------------------------------------------------------------------- the page's own parts
# A tiny model trained on synthetic data is enough here, so these run without the real data.


@pytest.fixture(scope="module")
def tiny_page(browser, tiny_run):
    """The page of a service of the tiny run, with every response that failed recorded."""
    with running_server(tiny_run) as (host, port, _):
        page = browser.new_page()
        failed = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
        page.goto(f"http://{host}:{port}/")
        page.wait_for_load_state("networkidle")
        page.failed = failed
        yield page
        page.close()


def test_page_has_its_own_icon_and_no_failed_request(tiny_page):
    icon = tiny_page.get_attribute("link[rel=icon]", "href")
    assert icon.startswith("data:image/svg+xml,")
    width = tiny_page.evaluate("""href => new Promise(done => {
        const img = new Image(); img.onload = () => done(img.naturalWidth); img.onerror = () => done(0); img.src = href;
    })""", icon)
    assert width > 0  # the icon decodes: no request for /favicon.ico, no 404
    assert tiny_page.failed == []


def test_api_link_leads_to_the_api_description_offline(tiny_page):
    """The link works without the internet: the OpenAPI description, served by the service."""
    href = tiny_page.locator("header a", has_text="API").get_attribute("href")
    response = tiny_page.request.get(tiny_page.url.rstrip("/") + href)
    assert response.status == 200
    assert "/v1/predict" in response.json()["paths"]


def test_a_rejected_file_leaves_no_broken_image(tiny_page, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    tiny_page.set_input_files("#file-input", str(path))
    sync_api.expect(tiny_page.locator("#status")).to_contain_text("Error 415", timeout=20_000)
    sync_api.expect(tiny_page.locator("#preview")).to_be_hidden()
    sync_api.expect(tiny_page.locator("#model-input")).to_be_hidden()
    assert tiny_page.get_attribute("#preview", "src") is None


def test_the_page_says_when_its_model_never_saw_a_photo(tiny_page):
    """Before the first upload: a model trained on the scans alone flags most real photos."""
    note = tiny_page.locator("#scan-model-note")
    sync_api.expect(note).to_be_visible(timeout=20_000)
    assert "fmnist train --preset photo" in note.inner_text()


def test_the_page_of_a_photo_run_has_no_such_note(browser, photo_folder, shared_synthetic_dir, tmp_path):
    from fmnist.training.loop import train

    config = small_config(shared_synthetic_dir, tmp_path / "photo", steps=2, photos=str(photo_folder),
                          photo_share=0.25)
    run = train(config, progress=False, log=quiet).run_dir
    with running_server(run) as (host, port, _):
        page = browser.new_page()
        page.goto(f"http://{host}:{port}/")
        sync_api.expect(page.locator("#model-info")).to_contain_text("Model:", timeout=20_000)  # /healthz read
        sync_api.expect(page.locator("#scan-model-note")).to_be_hidden()
        page.close()


def test_page_with_an_api_key_asks_for_it_once(browser, tmp_path):
    """A service with --api-key: the page asks for the key on its first 401 and classifies; its
    Content-Security-Policy lets the page do all it does (no violation in the console)."""
    key = "browser-key-0123456789abcdef"
    run = untrained_run(tmp_path / "untrained")
    with running_server(run.path, "--api-key", key) as (host, port, _):
        page = browser.new_page()
        prompts, console = [], []
        page.on("dialog", lambda dialog: (prompts.append(dialog.message), dialog.accept(key)))
        page.on("console", lambda message: console.append(message.text))
        page.goto(f"http://{host}:{port}/")
        path = tmp_path / "item.png"
        path.write_bytes(png(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)))
        page.set_input_files("#file-input", str(path))
        sync_api.expect(page.locator("#status")).to_contain_text("item.png", timeout=20_000)
        sync_api.expect(page.locator("#predictions li")).to_have_count(5, timeout=20_000)
        page.set_input_files("#file-input", str(path))  # the key is kept: no second question
        sync_api.expect(page.locator("#predictions li")).to_have_count(5, timeout=20_000)
        page.close()
    assert prompts == ["This service needs an API key:"]
    assert not [m for m in console if "Content Security Policy" in m], console
