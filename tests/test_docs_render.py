"""Every formula of the lesson pages is typeset, and every figure shown, in a browser offline.

The built site is served from 127.0.0.1 and opened in headless Chromium with every other host
unresolvable and a dead proxy, so MathJax has to come from the site itself. The server appends
a probe script to each page that waits for MathJax, then writes what it found (formulas,
rendered formulas, MathJax errors, image sizes) into the page; ``--dump-dom`` returns it.

Skipped only where no Chromium is installed (CI installs the Debian package ``chromium``).
"""

from __future__ import annotations

import functools
import html
import html.parser
import http.server
import io
import json
import re
import shutil
import subprocess
import threading

import pytest
from conftest import LESSON_PAGES

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LESSONS = LESSON_PAGES
PROBE = """<script>
(function () {
  function report(status) {
    var math = document.querySelectorAll(".arithmatex");
    var typeset = 0;
    math.forEach(function (e) { if (e.querySelector("mjx-container")) typeset++; });
    var images = Array.from(document.querySelectorAll("article img")).map(function (i) {
      return { src: i.getAttribute("src"), width: i.naturalWidth };
    });
    var out = document.createElement("pre");
    out.id = "render-probe";
    out.textContent = JSON.stringify({
      status: status,
      arithmatex: math.length,
      typeset: typeset,
      containers: document.querySelectorAll("mjx-container").length,
      errors: document.querySelectorAll("mjx-merror, [data-mjx-error]").length,
      images: images,
    });
    document.body.appendChild(out);
  }
  window.addEventListener("load", function () {
    if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) {
      report("MathJax did not load");
      return;
    }
    MathJax.startup.promise.then(
      function () { report("ok"); },
      function (e) { report("MathJax failed: " + e); }
    );
  });
})();
</script>"""
RAW_TEX = re.compile(r"\\\(|\\\[|\$\$")


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class _ProbingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; HTML pages get the probe script before ``</body>``."""

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if path.endswith("/"):
            path += "index.html"
        if not path.endswith(".html"):
            return super().send_head()
        try:
            with open(path, encoding="utf-8") as f:
                body = f.read().replace("</body>", PROBE + "</body>").encode()
        except OSError:
            return super().send_head()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


class _BodyText(html.parser.HTMLParser):
    """The visible text of ``<body>``: no scripts, styles or the probe."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0
        self._body = False

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self._body = True
        if tag in ("script", "style") or ("id", "render-probe") in attrs:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "pre") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if self._body and not self._skip:
            self.parts.append(data)


@pytest.fixture(scope="module")
def served_site(docs_site):
    handler = functools.partial(_ProbingHandler, directory=str(docs_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def render(browser: str, url: str, profile, *extra: str, timeout: float = 120) -> str:
    """Open ``url`` in headless Chromium with the network blocked; return stdout."""
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=127.0.0.1",
            "--virtual-time-budget=10000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("page", LESSONS)
def test_lesson_page_renders_offline(page, served_site, docs_site, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip(f"no browser: none of {', '.join(BROWSERS)} is on PATH")
    dom = render(browser, f"{served_site}/lessons/{page}/", tmp_path / "profile", "--dump-dom")
    found = re.search(r'<pre id="render-probe">(.*?)</pre>', dom, re.S)
    assert found, "the page's load event never fired (or the probe was not served)"
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["status"] == "ok", probe["status"]
    source = (docs_site / "lessons" / page / "index.html").read_text(encoding="utf-8")
    spans = len(re.findall(r'class="arithmatex"', source))
    assert probe["arithmatex"] == spans > 0
    assert probe["typeset"] == probe["containers"] == spans, probe
    assert probe["errors"] == 0, probe
    text = _BodyText()
    text.feed(dom)
    raw = RAW_TEX.findall("".join(text.parts))
    assert not raw, f"{len(raw)} formulas left as TeX source"
    figures = [i for i in probe["images"] if "assets/lessons/" in i["src"]]
    assert figures, "the lesson's figure is missing"
    assert all(i["width"] > 0 for i in probe["images"]), probe["images"]


NOTEBOOK_PAGES = (
    "lesson1_linear_ae_pca",
    "lesson2_deep_vs_linear",
    "lesson3_overcomplete",
    "lesson4_information_kl",
    "lesson5_intractable",
    "lesson6_vi_identity",
    "lesson7_ae_vs_vae",
    "lesson8_enumeration",
    "lesson9_posterior_quality",
)


@pytest.mark.slow
@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_notebook_page_renders_offline(page, served_site, tmp_path):
    """The notebooks' Markdown cells use `$...$`; MathJax typesets those too."""
    browser = _browser()
    if browser is None:
        pytest.skip(f"no browser: none of {', '.join(BROWSERS)} is on PATH")
    url = f"{served_site}/lessons/notebooks/{page}/"
    dom = render(browser, url, tmp_path / "profile", "--dump-dom")
    found = re.search(r'<pre id="render-probe">(.*?)</pre>', dom, re.S)
    assert found, "the page's load event never fired (or the probe was not served)"
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["status"] == "ok", probe["status"]
    assert probe["containers"] > 0 and probe["errors"] == 0, probe
    text = _BodyText()
    text.feed(dom)
    raw = re.findall(r"\$[^$\n]*\\[A-Za-z]+[^$\n]*\$", "".join(text.parts))
    assert not raw, f"formulas left as TeX source: {raw[:3]}"
