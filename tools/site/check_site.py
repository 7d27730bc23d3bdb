"""Open the built website in headless Chromium and check that its figures and formulas display.

Serves ``build/site`` on 127.0.0.1 (a free port, this process only), loads every page in Debian's Chromium
(``apt-get install -y chromium``) and reads back, after the page's ``load`` event, how many ``<img>`` elements
decoded (``naturalWidth > 0``), how many did not, and how many formulas MathJax typeset. To read those numbers
through ``chromium --dump-dom`` the server appends one small observer script to each HTML page it serves (the
files on disk are not changed); the script writes them into attributes of ``<body>``.

Fails (exit 1) when any image on any page does not decode, when a notebook page shows fewer figures than its
executed notebook has image outputs, when a notebook with formulas shows none typeset, or when a Markdown page with
formulas (pymdownx.arithmatex, e.g. the written questions) has fewer typeset than it has formulas. CI does not run it (it
needs Chromium); the test suite checks the build itself (tests/test_site.py).

    python tools/site/check_site.py                      # after make docs
    python tools/site/check_site.py --screenshot build/site-shots
    python tools/site/check_site.py --screenshot build/site-shots --page exercises --page questions
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

OBSERVER = b"""<script>
window.addEventListener("load", function () {
  function count() {
    var imgs = Array.prototype.slice.call(document.images);
    var b = document.body;
    b.setAttribute("data-check-imgs", imgs.length);
    b.setAttribute("data-check-imgs-shown", imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
    b.setAttribute("data-check-imgs-broken", imgs.filter(function (i) { return i.complete && i.naturalWidth === 0; })
      .map(function (i) { return i.getAttribute("src").slice(0, 80); }).join(" | "));
    b.setAttribute("data-check-math", document.querySelectorAll(".MathJax, .MathJax_Display, .MathJax_CHTML").length);
    b.setAttribute("data-check-done", "1");
  }
  if (window.MathJax && MathJax.Hub) { MathJax.Hub.Queue(count); } else { count(); }
});
</script>"""
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]


class ObservedHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; HTML pages get the observer script before ``</body>``."""

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        body = path.read_bytes()
        body = body.replace(b"</body>", OBSERVER + b"</body>", 1) if b"</body>" in body else body + OBSERVER
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io
        return io.BytesIO(body)

    def log_message(self, *args):
        pass


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(ObservedHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def chromium(browser: str, args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="check-site-") as profile:
        proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{browser} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def measure(browser: str, url: str, budget_ms: int, timeout: float) -> dict:
    dom = chromium(browser, [f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    body = re.search(r"<body[^>]*>", dom)
    attrs = dict(re.findall(r'data-check-([a-z-]+)="([^"]*)"', body.group(0) if body else ""))
    if attrs.get("done") != "1":
        raise RuntimeError(f"{url}: the observer script did not run (page did not finish loading?)")
    return {"imgs": int(attrs["imgs"]), "shown": int(attrs["imgs-shown"]), "math": int(attrs["math"]),
            "broken": attrs.get("imgs-broken", "")}


def notebook_expectations(page_dir: Path) -> tuple[int, bool] | None:
    """(image outputs, has formulas) of the executed notebook copied beside a notebook page, or None."""
    copies = list(page_dir.glob("*.ipynb"))
    if not copies:
        return None
    nb = json.loads(copies[0].read_text(encoding="utf-8"))
    images = sum(1 for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    math = any("$" in "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    return images, math


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", type=Path, default=Path(__file__).resolve().parents[2] / "build" / "site")
    parser.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--screenshot", type=Path, help="also save a PNG of every notebook page into this folder")
    parser.add_argument("--page", action="append", default=[], metavar="PATH",
                        help="with --screenshot, also a PNG of this page, e.g. source/minideeplab/textbook/conv")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time each page gets to settle")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"error: no site at {args.site} (run make docs first)", file=sys.stderr)
        return 1
    if not Path(args.browser).exists():
        print(f"error: no Chromium at {args.browser} (apt-get install -y chromium)", file=sys.stderr)
        return 1
    server, base = serve(args.site)
    failures = []
    try:
        pages = sorted(p.relative_to(args.site) for p in args.site.rglob("index.html"))
        print(f"{'page':58s} {'<img>':>5s} {'shown':>5s} {'math':>5s}  expected")
        for rel in pages:
            url = base + rel.parent.as_posix() + "/" if rel.parent != Path(".") else base
            got = measure(args.browser, url, args.budget_ms, timeout=120)
            expected = notebook_expectations(args.site / rel.parent)
            formulas = (args.site / rel).read_text(encoding="utf-8").count('class="arithmatex"')
            note = ""
            if formulas:
                note = f"{formulas} formulas"
                if got["math"] < formulas:
                    failures.append(f"{rel.parent}: {got['math']} of its {formulas} formulas typeset")
            if got["broken"] or got["shown"] < got["imgs"]:
                failures.append(f"{rel.parent}: images that do not display: {got['broken'] or '(still loading)'}")
            if expected is not None:
                images, math = expected
                note = f"{images} figures" + (", formulas" if math else "")
                if got["shown"] < images or got["shown"] == 0:
                    failures.append(f"{rel.parent}: shows {got['shown']} figures, its notebook has {images}")
                if math and got["math"] == 0:
                    failures.append(f"{rel.parent}: the notebook has formulas, none was typeset")
            if args.screenshot and (expected is not None or rel.parent.as_posix() in args.page):
                args.screenshot.mkdir(parents=True, exist_ok=True)
                shot = (args.screenshot / f"{rel.parent.as_posix().replace('/', '_')}.png").resolve()
                chromium(args.browser, ["--window-size=1280,2400", f"--virtual-time-budget={args.budget_ms}",
                                        f"--screenshot={shot}", url], timeout=120)
                note = f"{note}, {shot.name}" if note else shot.name
            print(f"{str(rel.parent):58s} {got['imgs']:5d} {got['shown']:5d} {got['math']:5d}  {note}")
    finally:
        server.shutdown()
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"{len(pages)} pages, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
