"""Look at the built documentation site in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright, the site served from `site/` on localhost.

    pip install playwright && apt-get install -y chromium
    mkdocs build --strict && python .ci/docs_browser.py [out_dir]

Takes full-page screenshots of the quick-start, losses and paper pages (to be looked at: equations typeset,
plots shown, code highlighted), and checks, failing with exit code 1 otherwise: search finds "Plackett"
with no network; every page loads nothing from outside localhost; every image on the three pages loaded;
the losses page holds typeset MathML.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

SITE = Path(__file__).resolve().parent.parent / "site"
PAGES = ["quickstart.html", "losses.html", "paper.html"]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip


def _serve() -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def main(out_dir: str = "docs-screenshots") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    server, root = _serve()
    problems, outside = [], []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: None if r.url.startswith(root) else outside.append(r.url))
            for name in PAGES:
                page.goto(root + name, wait_until="networkidle")
                broken = page.eval_on_selector_all(
                    "article img", "imgs => imgs.filter(i => !i.naturalWidth).map(i => i.src)"
                )
                if broken:
                    problems.append(f"{name}: images not shown: {broken}")
                page.screenshot(path=str(out / name.replace(".html", ".png")), full_page=True)
            if page.goto(root + "losses.html") and page.locator("article math").count() < 5:
                problems.append("losses.html: fewer than 5 typeset equations (<math>)")
            page.keyboard.press("s")
            page.focus("input[data-md-component=search-query]")
            page.keyboard.type("Plackett")
            deadline = time.monotonic() + 20
            text = ""
            while time.monotonic() < deadline and "matching document" not in text:
                time.sleep(0.5)
                text = page.inner_text(".md-search-result__meta")
            if "matching document" not in text:
                problems.append(f"search: no results for 'Plackett' ({text!r})")
            page.screenshot(path=str(out / "search.png"))
            browser.close()
    finally:
        server.shutdown()
    if outside:
        problems.append(f"requests outside the local site: {sorted(set(outside))}")
    for problem in problems:
        print("docs_browser:", problem)
    print(f"docs_browser: screenshots in {out}/; {'OK' if not problems else 'FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
